"""`python -m klbench ...`: the same CLI, for launchers that take a module (deepspeed -m, torchrun -m)."""

from klbench.cli import main

if __name__ == "__main__":
    main()
