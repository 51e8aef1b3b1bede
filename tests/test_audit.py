"""klbench audit: the frameworks' shipped KL code through the exact verifier, and the presets that mirror it.

Tests that need a framework's wheel skip with the reason when it is not installed
(`bash scripts/setup.sh --test` installs the pinned `audit` extra with --no-deps).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as metadata
import itertools
import json
import time

import pytest
import torch

from klbench import audit, cli, kl

PRESETS = sorted(p.stem for p in audit.PRESETS_DIR.glob("*.yaml"))


def _installed(key: str) -> bool:
    try:
        metadata.version(audit.FRAMEWORKS[key].dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def needs(key: str):
    fw = audit.FRAMEWORKS[key]
    return pytest.mark.skipif(
        not _installed(key), reason=f"{fw.dist} not installed (pip install --no-deps {fw.dist}=={fw.pin})"
    )


@pytest.fixture(scope="module")
def modules() -> dict:
    """Each installed framework's loaded code, once per module."""
    return {
        k: audit.FRAMEWORKS[k].load() for k in ("verl", "openrlhf", "trl", "skyrl", "areal") if _installed(k)
    }


# ------------------------------------------------------------------ presets


def test_presets_exist_for_every_framework_default():
    cases = [c for c in audit.CASES if c.default.startswith("yes")]
    assert {c.framework for c in cases} == set(audit.FRAMEWORKS)
    referenced = {c.preset for c in audit.CASES if c.preset}
    assert referenced <= set(PRESETS), referenced - set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_says_what_it_reproduces(name):
    cli.prevalidate([f"kl=frameworks/{name}"], multirun=False)
    text = (audit.PRESETS_DIR / f"{name}.yaml").read_text()
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert header, f"{name}: no opening comment"
    assert "default" in header and ("coefficient" in header or "coef" in header), name
    assert any(c.isdigit() for c in header.split("\n")[0]), f"{name}: the first line names no version"
    spec = audit.load_preset(name)
    assert spec.as_loss or spec.in_reward


def _inputs(seed: int, n: int = 48, spread: float = 14.0):
    """Random log-probs `[N, 1]` with u over [−spread, spread] (inside and outside every clamp), a rollout policy."""
    gen = torch.Generator().manual_seed(seed)
    u = (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1) * spread  # [N, 1]
    logp = torch.minimum(u, torch.zeros_like(u)) - torch.rand(n, 1, generator=gen, dtype=torch.float64)
    old = (
        logp - (torch.rand(n, 1, generator=gen, dtype=torch.float64) * 2 - 1) * 3
    )  # log ρ in [−3, 3]: ρ up to 20
    # exactly representable in float32: OpenRLHF and AReaL cast their inputs with .float()
    logp, ref, old = (x.float().double() for x in (logp, logp - u, old))
    return logp, ref, old, torch.ones_like(u)


def _loss_and_grad(fn, logp, ref, old, mask):
    lp = logp.clone().requires_grad_(True)
    out = fn(lp, ref, old, mask)
    g = torch.autograd.grad(out, lp)[0] if out.requires_grad else torch.zeros_like(lp)
    return out.detach().to(torch.float64), g.to(torch.float64)


#: preset -> (framework, the audit case that wires the shipped function, aggregation the preset is used with)
SHIPPED = {
    "verl_low_var_kl": ("verl", "use_kl_loss, kl_loss_type=low_var_kl", "token_mean"),
    "verl_k3_plus": ("verl", "kl_loss_type=k3+", "token_mean"),
    "verl_kl_in_reward": ("verl", "use_kl_in_reward, kl_penalty=kl", None),
    "openrlhf_k1_in_reward": ("openrlhf", "kl.estimator=k1 (in reward)", None),
    "openrlhf_k2_loss": ("openrlhf", "kl.use_loss, estimator=k2", "token_mean"),
    "openrlhf_k3_loss": ("openrlhf", "kl.use_loss, estimator=k3", "token_mean"),
    "openrlhf_unbiased_gradient": ("openrlhf", "kl.use_loss, estimator=k3, unbiased_gradient", "token_mean"),
    "trl_bias_corrected_k3": ("trl", "beta>0, use_bias_correction_kl=True", "token_mean"),
    "trl_k3": ("trl", "beta>0, use_bias_correction_kl=False", "token_mean"),
    "skyrl_train_k3_loss": ("skyrl", "use_kl_loss, kl_estimator_type=k3", "seq_mean_token_mean"),
    "areal_k1_in_reward": ("areal", "kl_estimator=k1 (in reward)", None),
}


def test_every_installed_framework_preset_is_checked():
    shipped = {p for p in PRESETS if not p.startswith(("nemo_rl", "slime", "roll"))}
    assert shipped == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
@pytest.mark.parametrize("seed", [0, 1])
def test_preset_equals_shipped_function(name, seed, modules):
    """Values and gradients of the preset (klbench.kl) equal the installed framework's, to 1e-6."""
    key, option, agg = SHIPPED[name]
    if key not in modules:
        fw = audit.FRAMEWORKS[key]
        pytest.skip(f"{fw.dist} not installed (pip install --no-deps {fw.dist}=={fw.pin})")
    case = next(c for c in audit.CASES if c.framework == key and c.option == option)
    shipped = case.make(modules[key])
    spec = audit.load_preset(name)
    logp, ref, old, mask = _inputs(seed)
    if (
        case.placement == "reward"
    ):  # the framework's penalty values (the reward carries no gradient of its own)
        want = shipped(logp, ref, mask).to(torch.float64)
        got = kl.kl_in_reward(
            logp,
            ref,
            mask,
            estimator=spec.estimator,
            level=spec.level,
            reward_to_go=False,
            log_ratio_clamp=spec.log_ratio_clamp,
            value_clamp=spec.value_clamp,
        )
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        return

    def preset(lp, r, o, m):
        return spec.loss(lp, r, m, behaviour_logp=o, agg=agg)

    # one token per response: the gradient w.r.t. each entry is that token's own
    for behaviour in (old, logp.detach()):  # off-policy and on-policy
        v_want, g_want = _loss_and_grad(shipped, logp, ref, behaviour, mask)
        v_got, g_got = _loss_and_grad(preset, logp, ref, behaviour, mask)
        torch.testing.assert_close(v_got, v_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g_got, g_want, rtol=1e-6, atol=1e-6)
    # OpenRLHF's straight-through value is sg(k) + w·k2 − sg(w·k2) in float32: it carries the rounding of
    # w·k2 (up to ~40 here, float32 spacing 4e-6); everything else agrees to 1e-6
    value_tol = 1e-5 if name == "openrlhf_unbiased_gradient" else 1e-6
    for i in range(0, len(logp), 6):  # per-token values
        row = (logp[i : i + 1], ref[i : i + 1], old[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(
            _loss_and_grad(preset, *row)[0], _loss_and_grad(shipped, *row)[0], rtol=1e-6, atol=value_tol
        )


def test_shipped_comparison_can_fail(modules):
    """The comparison above is not vacuous: a preset with another clamp differs from the shipped function."""
    if "verl" not in modules:
        pytest.skip("verl not installed")
    case = next(c for c in audit.CASES if c.option == "use_kl_loss, kl_loss_type=low_var_kl")
    shipped = case.make(modules["verl"])
    wrong = kl.KLSpec(coef=0.1, estimator="k3", placement="loss", log_ratio_clamp=20.0, value_clamp=None)
    logp, ref, old, mask = _inputs(0)
    _, g_want = _loss_and_grad(shipped, logp, ref, old, mask)
    _, g_got = _loss_and_grad(
        lambda lp, r, o, m: wrong.loss(lp, r, m, agg="token_mean"), logp, ref, old, mask
    )
    assert not torch.allclose(g_got, g_want, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the rows come from the frameworks' code


def _case(option: str) -> audit.Case:
    return next(c for c in audit.CASES if c.option == option)


@needs("verl")
def test_a_row_changes_when_the_framework_function_does(monkeypatch):
    """Replace verl's kl_penalty by k1: the low_var_kl loss row must turn into a zero gradient."""
    case = _case("use_kl_loss, kl_loss_type=low_var_kl")
    _, before = audit.run_audit(["verl"], cases=[case])
    assert before[0].verdict == "other" and before[0].drifts[1].err_rkl > 0.1
    assert before[0].clamp_region == "u < −2.61 or u > 11.00"

    def load_with_k1():
        module = audit._load_verl()
        module.kl_penalty = lambda logprob, ref_logprob, kl_penalty: logprob - ref_logprob
        return module

    monkeypatch.setitem(
        audit.FRAMEWORKS, "verl", dataclasses.replace(audit.FRAMEWORKS["verl"], load=load_with_k1)
    )
    _, after = audit.run_audit(["verl"], cases=[case])
    assert after[0].verdict == "zero" and after[0].per_token == "1 (k1's)"
    assert after[0].clamp_region == "none"


@needs("skyrl")
def test_skyrl_kl_loss_has_no_gradient_because_of_its_decorator(modules):
    fn = modules["skyrl"].compute_approx_kl
    logp = torch.zeros(2, 3, requires_grad=True)
    out = fn(logp, torch.full((2, 3), -1.0), kl_estimator_type="k3")
    assert not out.requires_grad
    with pytest.raises(RuntimeError):
        out.sum().backward()


@needs("trl")
def test_trl_default_row_reads_trl_defaults(modules):
    d = modules["trl"].defaults
    res = audit.measure(_case("beta=0.0 (defaults)"), modules["trl"], audit.FRAMEWORKS["trl"], "installed")
    assert d["beta"] == 0.0 and res.verdict == "zero"
    res = audit.measure(
        _case("beta>0, use_bias_correction_kl=True"), modules["trl"], audit.FRAMEWORKS["trl"], "installed"
    )
    assert d["use_bias_correction_kl"] is True and res.per_token == "u (k2's)"  # k2's gradient, on-policy
    assert not res.nan_safe


def test_reimplemented_rows_run_without_any_framework():
    statuses, results = audit.run_audit(["slime", "roll"])
    assert [s.status for s in statuses] == ["re-implemented"] * 2
    by = {r.option: r for r in results}
    assert by["use-kl-loss, kl-loss-type=k1 (default)"].verdict == "zero"
    roll = by["use_kl_loss (k3, hard-coded)"]
    assert roll.per_token == "1 − e^−u (k3's)" and not roll.nan_safe and "float32" in roll.finite
    assert roll.clamp_region == "u < −2.61 or u > 11.00"
    assert all(r.source.startswith("re-implemented from") for r in results)


# ------------------------------------------------------------------ failures stay one line


def test_moved_symbol_is_one_line_and_the_other_rows_still_run(monkeypatch, capsys):
    def moved():
        return audit.exec_definitions("klbench", "klbench/kl.py", ["kl_penalty_moved"])

    fake = audit.Framework(
        "verl", "verl", "klbench", "0.9.1", "verl.trainer.ppo.core_algos.kl_penalty", moved
    )
    monkeypatch.setitem(audit.FRAMEWORKS, "verl", fake)
    monkeypatch.setattr(
        audit, "installed_file", lambda dist, rel: audit.Path(audit.__file__).with_name("kl.py")
    )
    statuses, results = audit.run_audit(["verl", "slime"])
    assert statuses[0].status == "broken"
    msg = statuses[0].message
    assert "\n" not in msg and msg.startswith("verl ") and "kl_penalty" in msg and "kl_penalty_moved" in msg
    assert results and all(r.framework == "slime" for r in results)
    assert audit.main(["--frameworks", "verl,slime"]) == 1
    out = capsys.readouterr().out
    assert msg in out and "slime" in out


def test_changed_signature_is_reported():
    def f(a, b):
        return a

    with pytest.raises(audit.FrameworkBroken, match="changed signature: no parameter kl_penalty"):
        audit._check_params(f, "kl_penalty", ["a", "kl_penalty"])


def test_missing_wheel_is_skipped_not_an_error(monkeypatch, capsys):
    fake = dataclasses.replace(audit.FRAMEWORKS["areal"], dist="klbench-no-such-package")
    monkeypatch.setitem(audit.FRAMEWORKS, "areal", fake)
    assert audit.main(["--frameworks", "areal,roll"]) == 0
    out = capsys.readouterr().out
    assert "klbench-no-such-package is not installed" in out and "ROLL" in out


def test_a_case_that_raises_marks_its_framework_broken():
    def boom(_):
        def fn(lp, ref, old, mask):
            raise TypeError("compute_approx_kl() got an unexpected keyword argument 'kl_estimator'")

        return fn

    case = dataclasses.replace(_case("use_kl_loss (k3, hard-coded)"), make=boom)
    statuses, results = audit.run_audit(["roll"], cases=[case])
    assert statuses[0].status == "broken" and "unexpected keyword" in statuses[0].message and not results


# ------------------------------------------------------------------ the command


def test_cli_writes_the_table(run_cli, tmp_path):
    proc = run_cli("audit", "--frameworks", "nemo_rl,slime,roll", "--out", str(tmp_path / "out"))
    assert "NeMo-RL" in proc.stdout and "zero-gradient region" in proc.stdout
    md = (tmp_path / "out" / "audit.md").read_text()
    assert md.startswith("# What your framework's KL term optimises")
    assert "Command: `klbench audit --frameworks nemo_rl,slime,roll --out" in md and "klbench commit" in md
    data = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert {r["framework"] for r in data["rows"]} == {"nemo_rl", "slime", "roll"}
    assert data["git"]["commit"] and data["machine"]["cores"]
    assert all(r["verdict"] in ("∇RKL", "∇FKL", "zero", "other") for r in data["rows"])


def test_cli_error_is_one_line(run_cli):
    proc = run_cli("audit", "--frameworks", "megatron", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("klbench: error: unknown framework(s) megatron")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_full_audit_within_three_minutes(run_cli, tmp_path):
    """What CI runs: every framework (the installed ones for real), the table written, in under 3 minutes."""
    start = time.perf_counter()
    proc = run_cli("audit", "--out", str(tmp_path), timeout=300)
    assert time.perf_counter() - start < 180
    data = json.loads((tmp_path / "audit.json").read_text())
    status = {f["key"]: f["status"] for f in data["frameworks"]}
    for key, fw in audit.FRAMEWORKS.items():
        if fw.dist is None:
            assert status[key] == "re-implemented"
        elif _installed(key):
            assert status[key] == "installed", (key, proc.stdout)
        else:
            assert status[key] == "missing" and f"{fw.dist} is not installed" in proc.stdout
    ran = {r["framework"] for r in data["rows"]}
    assert ran == {k for k, s in status.items() if s in ("installed", "re-implemented")}
    assert (tmp_path / "audit.md").read_text().count("\n| ") > len(data["rows"])


def test_findings_are_checked_against_the_measured_rows():
    """Each finding of the review is a predicate on its row: it can come out refuted."""
    results = audit.run_audit(frameworks=["slime", "roll", "nemo_rl"])[1]
    rows = audit.findings(results)
    assert rows and all(r[2] == "**confirmed**" for r in rows), rows
    flipped = [dataclasses.replace(r, verdict="∇RKL") if r.framework == "slime" and "k1" in r.option else r for r in results]
    verdicts = {r[1]: r[2] for r in audit.findings(flipped)}
    assert verdicts["`use-kl-loss, kl-loss-type=k1 (default)`: the default k1 loss has zero expected gradient"] == \
        "**refuted**"
