"""The doctor's report: one rich table or panel per section of ``Diagnosis.stats``, then the verdict."""

from __future__ import annotations

from typing import Any

from rich.columns import Columns
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..chat import completion_text
from ..run.memory import size_text

_BAR = "█"


def _pairs(title: str) -> Table:
    return Table(title=title, show_header=False, title_justify="left")


def show_model(console, stats: dict[str, Any]) -> None:
    table = _pairs("Model")
    path = f" -> {stats['path']}" if stats["path"] != stats["name"] else ""
    table.add_row("model", stats["name"] + path)
    table.add_row("parameters", f"{stats['parameters']:,} ({stats['trainable']:,} trainable"
                                f"{', LoRA' if stats['lora'] else ''}), {stats['dtype']}, on {stats['device']}")
    table.add_row("tokenizer", f"{stats['tokenizer']}, vocabulary {stats['vocab']:,}, chat template: "
                               f"{'yes' if stats['chat_template'] else 'no'}")
    table.add_row("loaded in", f"{stats['load_s']:.1f} s (model, tokenizer, prompts, reward functions)")
    if stats["device"] == "cpu":
        sampling = " (the doctor samples with 1: the CPU is shared)" if stats.get("doctor_threads") else ""
        table.add_row("CPU", f"torch uses {stats['threads']} thread(s) on {stats['cores']} cores{sampling}; load "
                             f"average {stats['load_average']:.1f} before the doctor started")
    matmul = stats.get("cpu_matmul")
    if matmul is not None:
        chosen = (f"{matmul['kernel']} (train.cpu_matmul={matmul['choice']}); auto would pick {matmul['auto']}"
                  if matmul["choice"] != "auto" else f"{matmul['kernel']} (train.cpu_matmul=auto)")
        table.add_row("CPU matmul", f"{chosen}: {matmul['reason']}")
    console.print(table)


def show_prompt(console, stats: dict[str, Any]) -> None:
    how = ("rendered with the chat template (add_generation_prompt=True), encoded without the tokenizer's special "
           "tokens" if stats["chat"] else "text, encoded with the tokenizer's special tokens")
    body = Text()
    body.append("as written:   ", style="bold")
    body.append(stats["as_written"] + "\n")
    body.append("as the model reads it", style="bold")
    body.append(f" ({how}; {stats['tokens']} tokens):\n")
    body.append(stats["as_read"], style="cyan")
    if stats["double_bos"]:
        body.append("\nwarning: the prompt starts with two BOS tokens", style="yellow")
    console.print(Panel(body, title="First training prompt", title_align="left"))


def show_end(console, stats: dict[str, Any]) -> None:
    table = Table(title="End of a completion", title_justify="left")
    for name, justify in (("id", "right"), ("token", "left"), ("from", "left")):
        table.add_column(name, justify=justify)
    for token, name, sources in stats["ids"]:
        table.add_row(str(token), name, sources)
    if stats["stop_strings"]:
        table.add_row("", ", ".join(map(repr, stats["stop_strings"])), "rollout.stop (stop strings)")
    console.print(table)
    if stats["chat"] and stats["end_of_turn"] is not None:
        token, name = stats["end_of_turn"]
        verdict = "an end id" if stats["end_of_turn_ends"] else "[red]NOT an end id[/red]"
        console.print(f"The chat template closes an assistant turn with {name} (id {token}): {verdict}.")


def show_batch(console, stats: dict[str, Any]) -> None:
    k, completions = stats["k"], stats["completions"]
    table = _pairs(f"One batch: {stats['sampled']} of {stats['planned']} prompts x {k} completions")
    if stats["partial_because"]:
        table.add_row("sampled", f"{stats['sampled']} of the first step's {stats['planned']} prompts "
                                 f"({stats['partial_because']}); rates below are over these, the memory estimate is for "
                                 "the full batch")
    table.add_row("sampling time", f"{stats['sample_s']:.1f} s for {completions} completions (max_new_tokens="
                                   f"{stats['max_new_tokens']}, temperature={stats['temperature']:g})")
    table.add_row("truncated", f"{stats['truncated'] / completions:.0%} ({stats['truncated']} of {completions} hit "
                               "max_new_tokens without an end token)")
    table.add_row("length", f"mean {stats['mean_length']:.1f} tokens, longest finished {stats['longest_finished']}")
    finished = completions - stats["truncated"]
    mask = (f"yes, for all {stats['covered']} finished completions" if not stats["outside"] else
            f"[red]NO[/red] for {stats['outside']} of {finished}")
    table.add_row("end token in loss mask", mask if finished else "not verified: no completion finished")
    if k > 1:
        scale = ", scale group" if stats["scale"] == "group" else ""
        table.add_row("groups with equal rewards", f"{stats['degenerate']} of {stats['groups']} "
                                                   f"({stats['degenerate'] / stats['groups']:.0%}): advantage 0 under "
                                                   f"baseline {stats['baseline']}{scale}")
    table.add_row("total reward", f"mean {stats['reward_mean']:.3g}, {len(stats['distinct_totals'])} distinct values")
    console.print(table)


def show_rewards(console, stats: dict[str, Any]) -> None:
    table = Table(title="Reward functions (each called alone on the batch)", title_justify="left")
    for name, justify in (("reward", "left"), ("weight", "right"), ("mean (judged)", "right"), ("judged", "right"),
                          ("groups with spread", "right"), ("latency", "right"), ("status", "left")):
        table.add_column(name, justify=justify)
    for row in stats["rows"]:
        timing = (f"{row['seconds']:.2f} s ({row['seconds'] / stats['size'] * 1e3:.2f} ms/sample)"
                  + (" async" if row["async"] else ""))
        weight = f"{row['weight']:g}" + (" (monitor)" if row["weight"] == 0 else "")
        if row["error"] is not None:
            table.add_row(row["name"], weight, "-", "-", "-", timing, "[red]failed[/red]")
            continue
        mean = f"{row['mean']:.3g}" if row["mean"] is not None else "-"
        table.add_row(row["name"], weight, mean, f"{row['judged']}/{stats['size']}", f"{row['spread']}/{row['groups']}",
                      timing, "[green]ok[/green]")
    console.print(table)
    charts = []
    for row in stats["rows"]:
        if row["error"] is not None:
            continue
        widest = max((n for _, n in row["histogram"]), default=1)
        chart = Table(title=row["label"], show_header=False, box=None, title_justify="left")
        chart.add_column("value", justify="right")
        chart.add_column("bar")
        chart.add_column("count", justify="right")
        for label, count in row["histogram"]:
            chart.add_row(label, Text(_BAR * max(1 if count else 0, round(24 * count / widest)), style="magenta"),
                          str(count))
        charts.append(chart)
    if charts:
        console.print(Columns(charts, padding=(0, 4)))
    for row in stats["rows"]:
        if row["error"] is not None:
            console.print(Text(row["label"] + ": ", style="red") + Text(row["error"]))


def show_examples(console, examples: list[dict[str, Any]]) -> None:
    table = Table(title="Examples (the first completion of a group)", title_justify="left")
    for name in ("group", "prompt", "completion", "reward", "ended"):
        table.add_column(name)
    for example in examples:
        table.add_row(str(example["group"]), Text(example["prompt"]), Text(repr(completion_text(example["completion"]))),
                      f"{example['reward']:.3g}", "end token" if example["finished"] else "truncated")
    console.print(table)


def show_memory(console, stats: dict[str, Any]) -> None:
    estimate = stats["estimate"]
    table = Table(title=f"Memory estimate: B={stats['sequences']} sequences of S={stats['prompt_tokens']}+"
                        f"{stats['new_tokens']} tokens, M={stats['micro']} per backward", title_justify="left")
    for name, justify in (("part", "left"), ("formula", "left"), ("size", "right")):
        table.add_column(name, justify=justify)
    for name, (size, formula) in estimate.parts.items():
        if size:
            table.add_row(name, formula, size_text(size))
    table.add_row("[bold]peak[/bold]", "runtime + weights + gradients + AdamW + max(sampling, update)",
                  f"[bold]{size_text(estimate.peak)}[/bold]")
    if stats["free"] is not None:
        table.add_row(stats["where"], "", size_text(stats["free"]))
    table.caption = (f"N={stats['parameters']:,} N_t={stats['trainable']:,} b={stats['weight_bytes']} "
                     f"a={stats['activation_bytes']} L={stats['layers']} d={stats['hidden']} I={stats['intermediate']} "
                     f"w={stats['kv_heads']}x{stats['head_dim']} V={stats['vocab']}"
                     f"{', checkpointing' if stats['checkpointing'] else ''}; peak resident memory of a train "
                     "process (memory_estimate in rlhf_pg/run/memory.py)")
    console.print(table)


def show_recipe(console, recipe: dict[str, Any]) -> None:
    import yaml

    text = yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None, width=max(console.width - 24, 60))
    console.print(Panel(Text(text.rstrip()), title="Resolved recipe (presets and overrides applied, defaults filled in)",
                        title_align="left"))


def show_verdict(console, diagnosis) -> None:
    seconds = diagnosis.stats["wall_s"]
    if not diagnosis.findings:
        console.print(Panel(f"No problems found in {seconds:.0f} s: ready to train.", title="Verdict",
                            title_align="left", border_style="green"))
        return
    table = Table(show_lines=True)
    for name in ("", "finding", "fix"):
        table.add_column(name)
    for finding in sorted(diagnosis.findings, key=lambda f: f.level != "problem"):
        mark = Text("problem", style="red") if finding.level == "problem" else Text("warning", style="yellow")
        table.add_row(mark, Text(finding.title, style="bold") + Text("\n" + finding.detail), Text(finding.fix))
    console.print(Panel(table, title=f"Verdict: {diagnosis.verdict()} ({seconds:.0f} s)", title_align="left",
                        border_style="red" if diagnosis.problems else "yellow"))
