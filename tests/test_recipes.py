"""Every recipe composes (each point of its sweep validated) and dry-runs for one step on CPU, with the
tiny model, the HF engine and the torch backend substituted for what needs a GPU or the hub."""

import itertools
import json
from pathlib import Path

import pytest

from klbench import cli

RECIPES = sorted(str(p.relative_to(cli.recipes_dir()).with_suffix("")) for p in cli.recipes_dir().rglob("*.yaml"))

#: Shrinks any recipe to one tiny on-CPU step: these keys are what a dry run changes, nothing else.
DRY = ["hydra.mode=RUN", "trainer.steps=1", "trainer.save_every=0", "trainer.resume=null", "trainer=default",
       "rollout=hf", "rollout.max_new_tokens=8", "logger=none", "algo.prompts_per_step=2", "algo.group_size=4",
       "algo.mini_batch_size=4", "trainer.threads=1"]


def test_recipes_found():
    assert {"miniature/kl_variants", "miniature/off_policy", "miniature/token_vs_sequence", "miniature/beta_sweep",
            "paper/qwen2.5-math-1.5b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header(recipe):
    text = (cli.recipes_dir() / f"{recipe}.yaml").read_text()
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert text.startswith("# @package _global_")
    for field in ("Reproduces:", "Command:", "Hardware:", "Expected"):
        assert field in header, f"{recipe}: the opening comment lacks '{field}'"
    assert f"recipe={recipe}" in header


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_every_sweep_point(recipe):
    cli.register()
    assert cli.prevalidate([f"recipe={recipe}"], multirun=False) is True  # recipes carry their sweep


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, run_cli, miniature_dir, shared_data, tmp_path):
    extra = [f"model.name_or_path={miniature_dir}"] if recipe.startswith("paper/") else []
    if recipe.startswith("paper/"):
        # the recipe's own field mapping (problem/answer) on a local file shaped like its hub dataset
        rows = tmp_path / "openr1.jsonl"
        rows.write_text("".join(json.dumps({"problem": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n"
                                for i in range(8)))
        # the miniature's tokenizer has no chat template: plain prompts stand in for the recipe's chat ones
        extra += ["data.source=jsonl", f"data.path={rows}", "data.prompt.template=plain", "model.dtype=float32",
                  "model.gradient_checkpointing=false", "eval.limit=2", "eval.samples=2", "eval.max_new_tokens=8",
                  "eval.every=1", f"+hydra.job.env_set.KLBENCH_DATA={shared_data}"]
    run_dir = tmp_path / "run"
    run_cli("run", f"recipe={recipe}", *DRY, *extra, f"hydra.run.dir={run_dir}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and "kl/rkl_k1" in rows[0]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    if recipe.startswith("paper/"):
        evals = {k for r in rows for k in r if k.startswith("eval/")}
        assert {"eval/math500/acc@2", "eval/aime24/acc@2", "eval/amc23/acc@2"} <= evals, evals
    assert Path(run_dir / "final" / "config.json").exists()
