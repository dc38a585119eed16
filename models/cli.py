"""`covey models ...`: build, inspect, benchmark and try the built-in models."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

__all__ = ["models_app"]

models_app = typer.Typer(help="The on-device models: build, info, bench, generate.",
                         no_args_is_help=True)
out = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def _emit_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, ensure_ascii=False, indent=2) + "\n")


@models_app.command("build")
def models_build(
    out_dir: Annotated[Path | None, typer.Option(
        "--out", help="Where to write the artifacts (default: the shipped folder).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of initialisation and sampling.")] = 1234,
    steps: Annotated[int | None, typer.Option(
        min=1, help="Training steps (default: the shipped model's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the tokenizer and the base model on the public share; export int8 ONNX."""
    from covey.models._artifacts import artifact_dir
    from covey.models._build import build
    from covey.models._model import ModelConfig
    from covey.models._train import TrainConfig

    target = out_dir or artifact_dir()
    columns = (TextColumn("{task.description:<10}"), BarColumn(), TextColumn("{task.completed}/"
               "{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=err, transient=False) as bar:
        tasks: dict[str, Any] = {}

        def report(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        train = TrainConfig(seed=seed) if steps is None else TrainConfig(seed=seed, steps=steps)
        card = build(target, ModelConfig(), train,
                     progress=report)
    if as_json:
        _emit_json(card)
    else:
        _print_card(card, target)


def _print_card(card: dict[str, Any], folder: Path) -> None:
    params = card["parameters"]
    out.print(f"[bold]{card['name']}[/] in {folder}")
    out.print(f"  parameters: {params['base']:,} base, {params['lora']:,} LoRA "
              f"({params['lora_bytes_fp32'] / 1024:.0f} KiB per adapter, fp32)")
    table = Table("set", "model", "perplexity", "top-1", "top-3")
    for split, results in (("public held-out", card["metrics"]["public_heldout"]),
                           ("federated test", card["metrics"]["federated_test"])):
        for name, q in results.items():
            table.add_row(split, name, f"{q['perplexity']:.2f}", f"{q['top1']:.3f}",
                          f"{q['top3']:.3f}")
    out.print(table)
    files = Table("file", "bytes", "sha256")
    for name, meta in card["files"].items():
        files.add_row(name, f"{meta['bytes']:,}", meta["sha256"][:16] + "…")
    out.print(files)


@models_app.command("info")
def models_info(
    data: Annotated[bool, typer.Option("--data", help="Show the data split instead.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Parameters, sizes, quantization, hashes and metrics of the shipped model."""
    if data:
        from covey.models._data import load_corpus

        stats = load_corpus().statistics()
        if as_json:
            _emit_json(stats)
            return
        table = Table("statistic", "value", title="chitchat-dataset split")
        for key, value in stats.items():
            table.add_row(key, json.dumps(value) if isinstance(value, dict) else str(value))
        out.print(table)
        return
    from covey.models._artifacts import Artifacts

    artifacts = Artifacts.load()
    if as_json:
        _emit_json({**artifacts.card, "folder": str(artifacts.folder)})
    else:
        _print_card(artifacts.card, artifacts.folder)


@models_app.command("bench")
def models_bench(
    quick: Annotated[bool, typer.Option("--quick", help="A short run.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Time to first token, decode speed, memory; embedder throughput (against torch)."""
    from covey.models import _bench, _bench_embedder

    results = {}
    for name, bench in (("language_model", _bench.bench_language_model),
                        ("embedder", _bench_embedder.bench_embedder)):
        with err.status(f"benchmarking the {name.replace('_', ' ')}…"):
            results[name] = bench(quick)
    if as_json:
        _emit_json(results)
    else:
        for result in results.values():
            for line in result["summary"]:
                out.print(line)


@models_app.command("generate")
def models_generate(
    prompt: Annotated[str, typer.Argument(help="Text to start from.")],
    backend: Annotated[str, typer.Option(help="onnx, torch or openai.")] = "onnx",
    url: Annotated[str | None, typer.Option(
        help="Server URL for --backend openai. Only PROMPT is sent: no pod is read, so "
             "there is nothing of a pod's to audit or consent to (covey chat and covey "
             "serve audit theirs).")] = None,
    model: Annotated[str, typer.Option(help="Model name for --backend openai.")] = "default",
    chat: Annotated[bool, typer.Option("--chat/--raw",
                                       help="Reply as the assistant, or continue raw text.")
                    ] = True,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 48,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.8,
    top_k: Annotated[int, typer.Option(min=0)] = 40,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 0.95,
    repetition_penalty: Annotated[float, typer.Option(min=1.0)] = 1.1,
    stop: Annotated[list[str] | None, typer.Option(help="Stop sequence (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
) -> None:
    """Generate from the model raw, streaming tokens as they come."""
    from covey.errors import InvalidInputError
    from covey.models._generate import SamplingParams, create_generator
    from covey.models._tokenizer import ChatMessage

    options: dict[str, Any] = {}
    if backend == "openai":
        if not url:
            raise InvalidInputError("--backend openai needs --url")
        options = {"base_url": url, "model": model}
    try:
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, repetition_penalty=repetition_penalty,
                                stop=tuple(stop or ()), seed=seed)
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None
    generator = create_generator(backend, **options)
    cancel = threading.Event()
    pieces = (generator.stream_chat([ChatMessage("user", prompt)], params, cancel) if chat
              else generator.stream_text(prompt, params, cancel))
    try:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        cancel.set()
    sys.stdout.write("\n")
