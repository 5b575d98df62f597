"""The README's worked example runs as written, on a real (tiny, random) checkpoint path."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example_block() -> str:
    text = README.read_text()
    section = text[text.index("## RefLoRA on your PEFT model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_is_under_ten_lines():
    lines = [line for line in _example_block().splitlines() if line.strip()]
    assert len(lines) < 10, lines


def _run_example(code: str, path: str, batch: dict, n_batches: int) -> dict:
    torch.manual_seed(0)  # PEFT draws lora_A at random: both runs must start identically
    namespace = {"path": path, "loader": [batch] * n_batches}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def test_readme_example_runs_and_refactors(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 12))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    code = _example_block()
    # warmup_steps=100 in the README: 103 batches, so that three refactored steps run.
    ours = _run_example(code, str(tmp_path), batch, 103)
    assert ours["refactorer"].step_count == 103
    # Twin run without the refactorer: identical up to step 100, different afterwards.
    attach_line = next(line for line in code.splitlines() if "Refactorer(" in line and "=" in line)
    plain = _run_example(code.replace(attach_line, "refactorer = None"), str(tmp_path), batch, 103)
    lora_b = {n: p for n, p in ours["model"].named_parameters() if "lora_B" in n}
    lora_b_plain = {n: p for n, p in plain["model"].named_parameters() if "lora_B" in n}
    assert lora_b and lora_b.keys() == lora_b_plain.keys()
    # PEFT starts lora_B at 0; the warm-up must have moved it and nothing may be NaN.
    assert all(torch.isfinite(p).all() and p.abs().sum() > 0 for p in lora_b.values())
    # The three refactored steps changed the trajectory (a no-op hook would leave it equal).
    assert any(not torch.equal(lora_b[n], lora_b_plain[n]) for n in lora_b)


# ------------------------------------------------------------------ the API table, row by row

def _api_rows() -> dict[str, str]:
    """``{call as written in the README: what it is}`` for every row of the API table."""
    text = README.read_text()
    section = text[text.index("## API"):]
    section = section[:section.index("\n## ", 1)]
    rows = {}
    for line in section.splitlines():
        match = re.match(r"\| `([^`]+)` \| (.*?) \|", line)
        if match:
            rows[match.group(1)] = match.group(2)
    return rows


def _namespace(tmp_path):
    """Bindings for the names the README's API calls use, on small real problems."""
    import reflora_analysis
    from reflora_analysis import config, methods, pairs, probes, refactor, sweep, tasks, theory, train

    g = torch.Generator().manual_seed(0)
    m, n, r = 7, 5, 3
    A = torch.randn(m, r, dtype=torch.float64, generator=g)
    B = torch.randn(n, r, dtype=torch.float64, generator=g)
    G = torch.randn(m, n, dtype=torch.float64, generator=g)
    task = tasks.make_task("mf", seed=0)
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(5, 7)),
                                peft.LoraConfig(r=3, target_modules=["0"]))
    return dict(
        reflora_analysis=reflora_analysis, theory=theory, pairs=pairs, refactor=refactor,
        methods=methods, tasks=tasks, train=train, probes=probes, config=config, sweep=sweep,
        cfg=config.RunConfig(task="mf", method="reflora", steps=3),
        run=train.build_run(config.RunConfig(task="mf", method="reflora", steps=3)), step=0,
        sweep_dir=tmp_path / "sweep",
        A=A, B=B, G=G, X=A.T @ A, Y=B.T @ B, S=theory.optimal_preconditioner(A, B),
        eta=0.01, L=10.0, loss=torch.tensor(1.0, dtype=torch.float64),
        model_or_pairs=[(torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone()))],
        model=model, task=task, method="reflora", optimizer="sgd", lr=0.01,
        warmup_steps=2, interval=1, damping=0.0, name="mf", seed=0, device="cpu", quick=True,
        steps=5)


def _check(call: str, result, ns) -> None:
    """What each documented call must give, checked against the maths, not its own output."""
    theory = ns["theory"]
    A, B, X, Y = ns["A"], ns["B"], ns["X"], ns["Y"]
    tol = dict(rtol=1e-9, atol=1e-9)  # float64, r = 3: round-off ~1e-14, 1e-9 leaves margin
    if call.startswith(("theory.geometric_mean(", "theory.optimal_preconditioner(")):
        S = result
        target = (X, Y) if call.startswith("theory.geometric_mean(") else (X, Y)
        torch.testing.assert_close(S @ target[0] @ S, target[1], **tol)  # F3: S X S = Y
    elif call.startswith("theory.geometric_mean_and_inverse("):
        S, S_inv = result[0], result[1]
        torch.testing.assert_close(S @ S_inv, torch.eye(3, dtype=S.dtype), **tol)
        torch.testing.assert_close(S @ X @ S, Y, **tol)
    elif call.startswith("theory.scalar_preconditioner("):
        assert float(result) == pytest.approx(float(B.norm() / A.norm()), rel=1e-12)  # F7
    elif call.startswith("theory.refactor_balanced("):
        Ab, Bb = result
        torch.testing.assert_close(Ab @ Bb.T, A @ B.T, **tol)
        torch.testing.assert_close(Ab.T @ Ab, Bb.T @ Bb, **tol)  # F4
    elif call.startswith("theory.weight_update("):
        eta, G, S = ns["eta"], ns["G"], ns["S"]
        A1, B1 = A - eta * G @ B @ torch.linalg.inv(S), B - eta * G.T @ A @ S  # F1
        torch.testing.assert_close(result, A1 @ B1.T - A @ B.T, **tol)  # F2
    elif call.startswith("theory.upper_bounds("):
        exact, relaxed = (float(v) for v in result)
        assert exact <= relaxed + 1e-9 * abs(relaxed)  # F8: U_relaxed relaxes U_exact
    elif call.startswith("theory.balance_gap("):
        Ab, Bb = theory.refactor_balanced(A, B)
        assert float(result) > 1e-3 and float(theory.balance_gap(Ab, Bb)) < 1e-9
    elif call.startswith("pairs.find_lora_pairs("):
        (pair,) = result
        assert pair.shape == (7, 5) and pair.rank == 3
    elif call.startswith("refactor.Refactorer("):
        assert isinstance(result, ns["refactor"].Refactorer) and len(result.pairs) == 1
    elif call.startswith("methods.build_optimizer("):
        opt, transform = result
        assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == ns["lr"]
        assert transform is not None
    elif call.startswith("tasks.make_task("):
        assert result.name == "mf" and result.pairs
    elif call.startswith("train.run("):
        assert [r["step"] for r in result] == list(range(ns["steps"] + 1))
        assert [r["step"] for r in result if "balance/gap_max" in r] == [0, 5]
    elif call.startswith("config.RunConfig("):
        assert result.method == "reflora" and result.optimizer == "adamw" and result.lr == 0.01
        same = ns["config"].RunConfig(task="mf", method="reflora", steps=5, optimizer="adamw",
                                      lr=0.01)
        assert result == same and hash(result) == hash(same)
        with pytest.raises(Exception):  # frozen: one validated configuration
            result.steps = 7
    elif call.startswith("train.build_run("):
        assert result.task.name == "mf" and result.optimizer is not None
    elif call.startswith("train.train_step("):
        assert result.step == 0 and result.updated and result.loss == result.loss
    elif call.startswith("sweep.run_sweep("):
        assert sorted((r["method"], r["seed"]) for r in result) == [
            ("lora", 0), ("lora", 1), ("reflora", 0), ("reflora", 1)]
        assert all(r["status"] == "finished" for r in result)
    elif call.startswith("probes.make_probes("):
        assert [type(p).__name__ for p in result] == ["BalanceProbe", "ConsistencyProbe"]
    else:  # a new row needs a check here: the README may not promise an untested call
        raise AssertionError(f"no check for the README's API row {call!r}")


def test_every_api_row_of_the_readme_runs_as_written(tmp_path):
    rows = _api_rows()
    assert len(rows) >= 18, rows
    for call in rows:
        ns = _namespace(tmp_path)
        result = eval(call, ns)  # the call exactly as the README writes it
        _check(call, result, ns)


# ------------------------------------------------------------- the README's shell commands

def _bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)


def _commands(block: str) -> list[str]:
    """One string per command: continuation lines joined, trailing comments dropped."""
    joined = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_the_second_command_is_what_ci_runs():
    first, second = _commands(_bash_blocks()[0])
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert second in ci, "the README's test command and .ci/run differ"
    assert first.startswith(second.split(" && .venv/bin/python -m pytest")[0])
    assert first.endswith("reflora-analysis figures --quick")


@pytest.mark.slow
def test_every_command_line_example_runs(tmp_path, monkeypatch, capsys):
    """Runs the README's command-line block through ``cli.main`` in a scratch folder.

    Rules, so that nothing is skipped silently: a placeholder path (``/path/to``) or ``torchrun``
    (covered by tests/test_distributed.py) is not run; a synopsis line (``[--option]``, ``a | b``)
    has every option it shows checked against the command's ``--help`` (and both commands of
    ``a | b`` run); ``train ...`` repeats the earlier command with the same ``--out``; a real
    model's run (``nlu-minilm``) runs 2 steps in quick mode instead of its 300.
    """
    import shlex

    from reflora_analysis import cli

    monkeypatch.chdir(tmp_path)
    (block,) = [b for b in _bash_blocks() if "reflora-analysis probe" in b]
    commands = _commands(block)
    earlier: dict[str, list[str]] = {}
    ran, not_run = [], []
    for command in commands:
        if "/path/to" in command or command.startswith("torchrun"):
            not_run.append(command)
            continue
        words = shlex.split(command)
        assert words[0] == "reflora-analysis", command
        args = words[1:]
        if "|" in args:  # `methods | tasks`
            for sub in " ".join(args).split("|"):
                assert cli.main(sub.split()) == 0, sub
            ran.append(command)
            continue
        if any(a.startswith("[") for a in args):  # a synopsis: options exist in --help
            try:
                assert cli.main([args[0], "--help"]) == 0
            except SystemExit as exit_:  # argparse's --help may exit instead of returning
                assert exit_.code == 0
            help_text = capsys.readouterr().out
            for option in re.findall(r"--[a-z-]+", command):
                assert option in help_text, (option, command)
            ran.append(command)
            continue
        if "..." in args:
            out = args[args.index("--out") + 1]
            args = earlier[out] + [a for a in args if a != "..." and a not in earlier[out]]
            if "--resume" in args and "--overwrite" in args:
                args.remove("--overwrite")
        if "nlu-minilm" in args:
            args[args.index("--steps") + 1] = "2"
            args.append("--quick")
        if "--out" in args:
            Path(args[args.index("--out") + 1]).parent.mkdir(parents=True, exist_ok=True)
            earlier[args[args.index("--out") + 1]] = [a for a in args if a != "--resume"]
        status = cli.main(args + (["--no-progress"] if args[0] == "train" else []))
        assert status == 0, (command, capsys.readouterr().err)
        ran.append(command)
    assert len(ran) >= 7 and len(not_run) <= 2, (ran, not_run)
