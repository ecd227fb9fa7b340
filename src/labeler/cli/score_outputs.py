"""``labeler score-outputs``: each feature's output score, by steering it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from labeler.cli.app import _layers, _open_labels, cli, console
from labeler.errors import UserError

if TYPE_CHECKING:
    from rich.console import Console

    from labeler.causal.output_score import LayerNull, OutputScore
    from labeler.labeling.store import LabelStore


class _StoredNulls:
    """Each layer's null kept in the label store (its meta table, by settings), so that
    a resumed run, or one scoring another selection, judges the layer's features
    against the null the first run measured."""

    def __init__(self, store: LabelStore, settings_key: str) -> None:
        self.store, self.settings_key = store, settings_key

    def _key(self, layer: int) -> str:
        return f"output_null/{self.settings_key}/{layer}"

    def get(self, layer: int) -> LayerNull | None:
        from labeler.causal.output_score import LayerNull

        text = self.store.get_meta(self._key(layer))
        if text is None:
            return None
        try:
            return LayerNull.from_json(text)
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{self.store.path}: the stored null of layer {layer} is damaged "
                            f"({exc}); restore the store from a copy") from exc  # fmt: skip

    def put(self, layer: int, null: LayerNull) -> None:
        self.store.set_meta(self._key(layer), null.to_json())


@cli.command("score-outputs")
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option(
    "--select",
    "groups",
    multiple=True,
    metavar="FIELD=VALUE[,...]",
    help="Only features whose final label meets every condition (repeatable).",
)
@click.option(
    "--features",
    "ids_file",
    type=click.Path(path_type=Path),
    default=None,
    help="Only these feature ids (one a line).",
)
@click.option("--layers", default=None, help="Only these layers (comma-separated).")
@click.option(
    "--contexts",
    default=16,
    show_default=True,
    help="Corpus windows (the run's detection negatives) steered over.",
)
@click.option(
    "--strength",
    default=1.0,
    show_default=True,
    help="The multiple of a feature's mean activation added along its decoder.",
)
@click.option(
    "--null",
    "null_directions",
    default=19,
    show_default=True,
    help="Random directions per layer the change is judged against.",
)
@click.option(
    "--lens-tokens",
    default=5,
    show_default=True,
    help="Logit-lens tokens named per feature (with the explanation's quoted words).",
)
@click.option(
    "--rows",
    "rows_per_batch",
    default=256,
    show_default=True,
    help="Steered windows per forward pass.",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--rescore", is_flag=True, help="Score again features scored with these settings.")
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              show_default=True)  # fmt: skip
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16"]),
              show_default=True)  # fmt: skip
def score_outputs(
    run: Path, groups: tuple[str, ...], ids_file: Path | None, layers: str | None,
    contexts: int, strength: float, null_directions: int, lens_tokens: int,
    rows_per_batch: int, seed: int, rescore: bool, device: str, dtype: str,
) -> None:  # fmt: skip
    """Score what each feature does to the model's output: steer it (add its decoder
    column at its mean activation) over corpus windows and measure the change in
    log-probability of the tokens its logit lens and explanation name, and the KL of the
    next-token distribution, against random directions of the same size.

    \b
    Scores are stored with the labels, a batch at a time (a stopped run resumes), and
    shown by `labeler summarize`, `labeler export` and the review page.
      labeler score-outputs RUN --select mechanism=output
    """
    import json

    import polars as pl

    from collectors.run_format import read_run_info
    from labeler.causal.output_score import OutputScore, ScoreSettings, score_features, windows
    from labeler.cli.render import progress_bar
    from labeler.cli.selection import selected_features
    from labeler.reporting.label_table import judgment_frame
    from labeler.run.data import RunData

    for name, value in (
        ("--contexts", contexts),
        ("--null", null_directions),
        ("--lens-tokens", lens_tokens),
        ("--rows", rows_per_batch),
    ):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")  # fmt: skip
    if strength <= 0:
        raise UserError(f"--strength {strength}: must be above 0")
    settings = ScoreSettings(contexts, strength, lens_tokens, null_directions, seed=seed)
    info = read_run_info(run)
    if info.unit != "feature":
        raise UserError(f"{run}: output scores steer adapter features; this run has {info.unit}s")
    data = RunData.open(run)
    alive = features = data.alive()
    if groups or ids_file is not None:
        chosen = set(selected_features(run, groups, ids_file))
        keys = pl.DataFrame({"layer": [f[0] for f in chosen], "index": [f[1] for f in chosen]},
                            schema={"layer": features["layer"].dtype,
                                    "index": features["index"].dtype})  # fmt: skip
        features = features.join(keys, on=["layer", "index"])
    wanted_layers = _layers(layers)
    if wanted_layers is not None:
        features = features.filter(pl.col("layer").is_in(wanted_layers))
    store = _open_labels(run)
    try:
        done = {
            fid for fid, payload in store.output_scores().items()
            if json.loads(payload).get("settings") == settings.key()
        } if not rescore else set()  # fmt: skip
        explanations = dict(
            judgment_frame(store, full=True)
            .filter(pl.col("explanation").is_not_null())
            .group_by("feature_id").agg(pl.col("explanation").first())
            .iter_rows()
        )  # fmt: skip
        todo = features.filter(~pl.col("feature_id").is_in(list(done)))
        if todo.is_empty():
            console.print(f"{run}: every selected feature ({len(features):,}) is scored already")
            return
        if done:
            console.print(f"resuming: {len(features) - len(todo):,} of {len(features):,} "
                          "features already scored")  # fmt: skip
        from adapters.branch import load_adapter
        from prompts import normalize_token

        with console.status("loading the model"):
            adapter, tokenizer, _ = load_adapter(info.adapter_path, device, dtype)
        adapter.model.eval()
        vocabulary: dict[str, list[int]] = {}
        for token_id in range(len(tokenizer)):
            key = normalize_token(tokenizer.decode([token_id]))
            if key:
                vocabulary.setdefault(key, []).append(token_id)
        context_ids = windows(data.negatives, contexts)

        def decode(i: int) -> str:
            return str(tokenizer.decode([i]))

        layer_counts = todo.group_by("layer").len()
        per_layer = dict(zip(layer_counts["layer"], layer_counts["len"], strict=True))
        with progress_bar(console, "steering", "features") as progress:
            task = progress.add_task("steering", total=len(todo))
            tally = _LayerTally(per_layer, progress.console)
            for scores in score_features(adapter, todo, explanations, vocabulary, context_ids,
                                         settings, decode, rows_per_batch, alive,
                                         _StoredNulls(store, settings.key())):  # fmt: skip
                store.put_output_scores(
                    [(s.feature_id, s.layer, s.model_dump_json(), s.significant) for s in scores]
                )
                progress.advance(task, len(scores))
                tally.add(scores)
        selected = set(features["feature_id"].to_list())
        every = [
            OutputScore.model_validate_json(payload)
            for fid, payload in store.output_scores().items() if fid in selected
        ]  # fmt: skip
    finally:
        store.close()
    from labeler.cli.render import output_score_table

    console.print(f"scored {len(todo):,} features; `labeler summarize {run}` shows the shares")
    current = [s for s in every if s.settings == settings.key()]
    if not current:
        return
    significant = sum(s.significant for s in current)
    level = f"{settings.level:g}"
    console.print(f"{significant:,} of {len(current):,} significant (p at most {level} "
                  "against random directions of the same size)")  # fmt: skip
    console.print(output_score_table(current, TOP_SHOWN))
    console.print(f"every feature's score: `labeler export {run}` (each line's "
                  f"output_score) or `labeler browse {run}`")  # fmt: skip


TOP_SHOWN = 10
"""Features shown at the end of ``score-outputs``, by the statistic judged."""


class _LayerTally:
    """Prints a line as each layer's features are all scored: how many, how many of them
    significant."""

    def __init__(self, per_layer: dict[int, int], out: Console) -> None:
        self.total, self.left, self.out = dict(per_layer), dict(per_layer), out
        self.significant: dict[int, int] = {}

    def add(self, scores: list[OutputScore]) -> None:
        for score in scores:
            layer = score.layer
            self.left[layer] -= 1
            self.significant[layer] = self.significant.get(layer, 0) + int(score.significant)
            if self.left[layer] == 0:
                self.out.print(f"layer {layer}: {self.total[layer]:,} features scored, "
                               f"{self.significant[layer]:,} significant")  # fmt: skip
