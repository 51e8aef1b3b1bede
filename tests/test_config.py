"""Bad configuration fails before any work, in one line that names the key and what is allowed."""

import pytest

from klbench import cli

BAD = [
    (["kl.coef=-1"], "kl.coef=-1.0 is not valid; must be >= 0"),
    (["algo.group_size=1"], "algo.group_size=1 is not valid; must be >= 2"),
    (["trainer.steps=0"], "trainer.steps=0 is not valid; must be >= 1"),
    (["rollout.max_logprob_mismatch=0"], "rollout.max_logprob_mismatch=0.0 is not valid; must be > 0"),
    (["kl.estimator=k4"], "kl.estimator='k4' is not valid; allowed: k1, k2, k3"),
    (["kl.placement=everywhere"], "allowed: none, reward, loss, both"),
    (["kl.coeff=0.1"], "unknown config key 'kl.coeff'; keys allowed at kl: coef, estimator"),
    (["+kl.coeff=0.1"], "unknown config key 'kl.coeff'"),
    (["stepz=3"], "unknown config key 'stepz'"),
    (["trainer.steps=abc"], "trainer.steps"),
    (["kl=k5_as_loss"], "Could not find 'kl/k5_as_loss'; available options in 'kl': k1_as_loss"),
    (["algo.mini_batch_size=7"], "must divide algo.group_size * algo.prompts_per_step = 128"),
    (["kl.off_policy=sg_ratio", "kl=k1_in_reward"], "set kl.placement=loss or both"),
    (["rollout.engine=sglang"], "allowed: hf, vllm"),
    (["kl.value_clamp=0"], "kl.value_clamp=0.0 is not valid; must be > 0 or null"),
    (["kl.grad_estimator=k5"], "kl.grad_estimator='k5' is not valid; allowed: same, k1, k2, k3, none"),
    (["kl=k1_in_reward", "kl.grad_estimator=k2"], "sets the gradient of a KL *loss*"),
    (["kl=none,k2_as_loss"], "is a sweep: add -m"),
    (["model.compile=true", "trainer.backend=deepspeed"], "model.compile=True is not valid; compiles with trainer.backend=torch"),
    (["model.compile=true", "model.gradient_checkpointing=true"], "cannot be combined with model.gradient_checkpointing"),
]


@pytest.mark.parametrize("overrides,expected", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_value_gives_one_line_error(overrides, expected, capsys):
    multirun = False
    with pytest.raises(SystemExit) as exc:
        cli.prevalidate(overrides, multirun)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("klbench: error: ")
    assert expected in err, err


def test_sweep_is_validated_point_by_point(capsys):
    with pytest.raises(SystemExit):
        cli.prevalidate(["kl=none,k2_as_loss", "kl.coef=0.1,-0.5"], multirun=True)
    assert "kl.coef=-0.5 is not valid" in capsys.readouterr().err


def test_good_sweep_passes():
    cli.prevalidate(["kl=none,k1_in_reward,k1_as_loss,k2_as_loss,k3_as_loss,k3_both,k2_as_loss_is,k3_as_loss_is",
                     "seed=0,1"], multirun=True)


def test_cli_error_has_no_traceback(run_cli):
    proc = run_cli("run", "kl.coef=-1", check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "klbench: error: kl.coef=-1.0 is not valid; must be >= 0"
