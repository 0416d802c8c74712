"""The Python API inside a real Jupyter kernel: docs/examples/quickstart.ipynb run by nbclient, the stop button
(SIGINT to the kernel) -> a checkpoint and TrainingInterrupted, resume, async rewards in the kernel's event loop."""

import json
import queue
import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "docs" / "examples" / "quickstart.ipynb"


def run_notebook(directory: Path, steps: int | None = None):
    """The notebook executed in a fresh kernel with ``directory`` as its working directory; ``steps`` replaces the
    value of its ``parameters`` cell (papermill's convention)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    if steps is not None:
        (cell,) = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        cell.source = f"steps = {steps}"
    client = nbclient.NotebookClient(notebook, timeout=900, kernel_name="python3",
                                     resources={"metadata": {"path": str(directory)}})
    client.execute()
    return notebook


def _text(notebook) -> str:
    return "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
                   if output.output_type == "stream")


def _accuracies(notebook) -> tuple[float, float, float]:
    """(before, after) from the training cell and the accuracy ``rlhf_pg.evaluate`` measures on final/."""
    text = _text(notebook)
    before, after = map(float, re.search(r"held-out accuracy ([\d.]+) -> ([\d.]+)", text).groups())
    evaluated = float(re.search(r"held-out accuracy ([\d.]+) on 500 prompts", text).group(1))
    return before, after, evaluated


def test_the_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    source = "".join(cell.source for cell in code)
    assert "def exact_sum(prompts, completions" in source and "datasets.Dataset.from_list" in source


def test_the_quickstart_notebook_runs_in_a_jupyter_kernel(tmp_path):
    notebook = run_notebook(tmp_path, steps=20)
    before, after, evaluated = _accuracies(notebook)
    assert after >= before + 0.1, (before, after)
    assert evaluated == pytest.approx(after)  # final/ evaluated again gives the summary's figure
    summary = json.loads((tmp_path / "runs" / "quickstart-notebook" / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["eval_reward_after"] == pytest.approx(after)
    displays = [output for cell in notebook.cells for output in cell.get("outputs", [])
                if output.output_type == "display_data"]
    # rich drew its live progress bar in an ipywidgets Output, and the tables as HTML
    assert any("application/vnd.jupyter.widget-view+json" in output.data for output in displays)
    assert any("text/html" in output.data and "held-out, greedy" in output.data["text/plain"] for output in displays)
    assert "install \"ipywidgets\"" not in _text(notebook)


@pytest.mark.slow
def test_the_quickstart_notebook_reaches_the_quickstart_figures(tmp_path):
    before, after, evaluated = _accuracies(run_notebook(tmp_path))
    assert before <= 0.45 and after >= 0.95 and evaluated == pytest.approx(after), (before, after, evaluated)


# --- a kernel driven by hand: the stop button, resume, async rewards -------------------------------------------------


def _execute(kernel, code: str, timeout: float = 300) -> tuple[dict, str]:
    """Run ``code`` in the kernel; ``(reply content, everything it printed)``."""
    return _reply(kernel, kernel.execute(code), timeout)


def _reply(kernel, msg_id: str, timeout: float) -> tuple[dict, str]:
    """The execute reply of ``msg_id`` and what it printed (stdout, stderr, the error line), once the kernel is idle."""
    deadline = time.monotonic() + timeout
    printed, reply, idle = [], None, False
    while not (idle and reply is not None):
        assert time.monotonic() < deadline, f"no reply in {timeout} s; printed: {''.join(printed)[-2000:]}"
        try:
            message = kernel.get_iopub_msg(timeout=0.2)
        except queue.Empty:
            message = None
        if message is not None and message["parent_header"].get("msg_id") == msg_id:
            content = message["content"]
            if message["msg_type"] == "stream":
                printed.append(content["text"])
            elif message["msg_type"] == "error":
                printed.append(f"{content['ename']}: {content['evalue']}")
            idle = idle or (message["msg_type"] == "status" and content["execution_state"] == "idle")
        if reply is None:
            try:
                message = kernel.get_shell_msg(timeout=0.05)
            except queue.Empty:
                continue
            if message["parent_header"].get("msg_id") == msg_id:
                reply = message["content"]
    return reply, "".join(printed)


def test_the_stop_button_checkpoints_then_resume_and_async_rewards_work_in_a_kernel(tiny_model_dir, tmp_path):
    from jupyter_client.manager import start_new_kernel

    manager, kernel = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        setup = f"""
import asyncio, threading, time, rlhf_pg
rows = [{{"prompt": f"{{a}}+{{b}}=", "answer": a + b}} for a in range(8) for b in range(8)]
recipe = {{"model": {tiny_model_dir!r}, "data": {{"num_eval": 6}},
          "rollout": {{"prompts_per_step": 4, "completions_per_prompt": 2, "max_new_tokens": 3}},
          "train": {{"steps": 40, "eval_every": 0, "save_every": 0, "tensorboard": False, "log_completions_every": 0}}}}
def digits(prompts, completions, answer, **kwargs):
    time.sleep(0.2)  # a slow reward: the run is still going when the stop button is pressed
    return [float(len(str(value))) for value in answer]
threads = {{t.name for t in threading.enumerate()}} | {{"tqdm_monitor"}}  # tqdm's one thread per process
"""
        reply, printed = _execute(kernel, setup)
        assert reply["status"] == "ok", printed
        run_dir = tmp_path / "run"
        msg_id = kernel.execute(f"rlhf_pg.train(recipe, reward_funcs=[digits], train_dataset=rows, "
                                f"output_dir={str(run_dir)!r})")
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and '"reward/mean"' in metrics.read_text()):  # a step is done
            assert time.monotonic() < deadline, "no training step within 180 s"
            time.sleep(0.2)
        manager.interrupt_kernel()  # the notebook's stop button: SIGINT to the kernel process
        reply, printed = _reply(kernel, msg_id, 120)
        assert reply["status"] == "error" and reply["ename"] == "TrainingInterrupted", printed
        assert "resume=True" in reply["evalue"] and "SIGINT: finishing the current step" in printed
        stopped = int(re.search(r"after step (\d+)", reply["evalue"]).group(1))
        assert (run_dir / f"checkpoint-{stopped}").is_dir() and stopped < 40

        resume = """
def digits(prompts, completions, answer, **kwargs):  # the cell edited: no more sleeping, same name
    return [float(len(str(value))) for value in answer]
result = rlhf_pg.train(recipe, reward_funcs=[digits], train_dataset=rows, output_dir=%r, resume=True)
print("resumed from", result.summary["resumed_from_step"], "steps", [m["step"] for m in result.metrics][-1])
print("new threads", sorted({t.name for t in threading.enumerate()} - threads))
""" % str(run_dir)
        reply, printed = _execute(kernel, resume)
        assert reply["status"] == "ok", printed
        assert f"resumed from {stopped} steps 40" in printed and "new threads []" in printed, printed

        in_loop = """
async def digits_async(prompts, completions, answer, **kwargs):
    await asyncio.sleep(0.01)
    return [float(len(str(value))) for value in answer]
print("loop running:", asyncio.get_running_loop().is_running())
result = rlhf_pg.train(recipe, reward_funcs=[digits_async], train_dataset=rows, output_dir=%r,
                       overrides={"train.steps": 2})
print("async reward", result.metrics[1]["reward/digits_async/mean"] == result.metrics[1]["reward/mean"] > 0)
""" % str(tmp_path / "async")
        reply, printed = _execute(kernel, in_loop)
        assert reply["status"] == "ok", printed
        assert "loop running: True" in printed and "async reward True" in printed, printed
    finally:
        kernel.stop_channels()
        manager.shutdown_kernel(now=True)
