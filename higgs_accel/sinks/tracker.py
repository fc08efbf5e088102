"""The tracker sink: what a TTS user looks at in accelerate's trackers (tensorboard, wandb...).

Every tracker gets the numeric fields of ``train_step`` and ``eval`` through ``accelerator.log``. TensorBoard and
wandb also get, at the step of their event, the eval and generated audio in their audio panel (read back from the
WAV files the ``eval_audio`` and ``generate_audio`` events name) and the prediction slices as a table (wandb) or a
markdown text (TensorBoard). Other trackers get the scalars only."""

from __future__ import annotations

from analysis.schema import BOOKKEEPING

from ..config import ConfigError, first_line
from .console import slice_cells

# Columns of the slice table, one row per pred_slice event: the targets shown as "pred/label" cells.
SLICE_COLUMNS = ("sample", "sample_key", "row", "match", "first", "last")


def slice_row(e: dict) -> list[str]:
    """One ``pred_slice`` event as a row of ``SLICE_COLUMNS``: mismatching targets as ``pred≠label``."""
    parts = [" ".join(a if same else f"{a}≠{b}" for a, b, same in slice_cells(e, part)) for part in ("first", "last")]
    row = "text" if e["modality"] == "text" else f"codebook {e['codebook']}"
    return [str(e["sample"]), str(e.get("sample_key") or ""), row, f"{e['n_match']}/{e['n_targets']}", *parts]


def audio_items(e: dict) -> list[tuple[str, str, str]]:
    """(tag, WAV path, caption) of each file an ``eval_audio`` or ``generate_audio`` event names; none when the
    event reports a failure."""
    if e["event"] == "eval_audio":
        acc = "n/a" if e["acc"] is None else f"{e['acc']:.2f}"
        return [(f"eval_audio/sample-{e['sample']}/{kind}", e[f"{kind}_path"],
                 f"step {e['step']} sample {e['sample']} {kind} (acc {acc})")
                for kind in ("pred", "label") if e[f"{kind}_path"]]
    return [(f"generate/prompt-{e['prompt']}", e["path"], f"step {e['step']}: {e['text']}")] if e["path"] else []


class TensorBoardMedia:
    """Audio and slices through TensorBoard's ``SummaryWriter``."""

    def __init__(self, writer):
        self.writer = writer

    def audio(self, items: list[tuple[str, str, str]], step: int) -> None:
        import soundfile as sf

        for tag, path, _ in items:
            wave, rate = sf.read(path, dtype="float32", always_2d=True)
            self.writer.add_audio(tag, wave.mean(1), step, sample_rate=rate)

    def slices(self, tag: str, rows: list[list[str]], step: int) -> None:
        def cell(text: str) -> str:  # a pipe would end the markdown cell
            return text.replace("|", "\\|")

        lines = ["| " + " | ".join(SLICE_COLUMNS) + " |", "|" + " --- |" * len(SLICE_COLUMNS)]
        lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
        self.writer.add_text(tag, "\n".join(lines), step)

    def flush(self) -> None:
        self.writer.flush()


class WandbMedia:
    """Audio and slices through a wandb run (``wandb.Audio``, ``wandb.Table``)."""

    def __init__(self, run):
        self.run = run

    def audio(self, items: list[tuple[str, str, str]], step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Audio(path, caption=caption) for tag, path, caption in items}, step=step)

    def slices(self, tag: str, rows: list[list[str]], step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Table(columns=list(SLICE_COLUMNS), data=rows)}, step=step)

    def flush(self) -> None:
        pass


MEDIA = {"tensorboard": TensorBoardMedia, "wandb": WandbMedia}


class TrackerSink:
    """Scalars of train_step and eval to ``accelerator.log``; audio and slices to the trackers in ``MEDIA``."""

    FAMILIES = ("train_step", "eval")

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.media = [MEDIA[t.name](t.tracker) for t in accelerator.trackers if t.name in MEDIA]
        # The pred_slice events of one (phase, step) arrive together; they go out as one table when the group ends.
        self.slices: list[dict] = []

    def write(self, e: dict) -> None:
        if e["event"] == "pred_slice":
            if self.slices and (self.slices[0]["phase"], self.slices[0]["step"]) != (e["phase"], e["step"]):
                self._send_slices()
            self.slices.append(e)
            return
        try:
            self._send_slices()
        finally:  # the event at hand goes out even when a tracker refused the slices before it
            self._send(e)

    def _send(self, e: dict) -> None:
        if e["event"] in self.FAMILIES:
            prefix = "eval/" if e["event"] == "eval" else "train/"
            values = {prefix + k: v for k, v in e.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in BOOKKEEPING | {"step"}}
            self.accelerator.log(values, step=e["step"])
        elif e["event"] in ("eval_audio", "generate_audio") and (items := audio_items(e)):
            self._each(lambda m: m.audio(items, e["step"]))

    def _send_slices(self) -> None:
        group, self.slices = self.slices, []  # cleared first: a failing tracker is not sent the group again
        if not group or not self.media:
            return
        tag, rows = f"slices/{group[0]['phase']}", [slice_row(e) for e in group]
        self._each(lambda m: m.slices(tag, rows, group[0]["step"]))

    def _each(self, call) -> None:
        """``call`` on every media tracker; one failing does not keep the others from theirs. The first error is
        raised afterwards, for the log to report."""
        errors = []
        for m in self.media:
            try:
                call(m)
            except Exception as e:  # noqa: BLE001 - re-raised below, after the other trackers
                errors.append(e)
        if errors:
            raise errors[0]

    def flush(self) -> None:
        try:
            self._send_slices()
        finally:
            self._each(lambda m: m.flush())

    def close(self) -> None:
        try:
            self._send_slices()
        finally:
            self.accelerator.end_training()


def check_trackers_start(names: list[str]) -> None:
    """A ConfigError (one line) for a tracker of ``log.log_with`` that would fail when the run starts trackers,
    after the model has loaded: wandb online with no credentials (no ``WANDB_API_KEY``, no ``wandb login``) and no
    terminal to ask on. Whether each is installed is the config's check (``config._check_trackers``)."""
    if "wandb" in names or "all" in names:
        _check_wandb_login()


def _check_wandb_login() -> None:
    import sys

    try:  # wandb's own resolution of mode and credentials (env, settings files, netrc), asking nothing
        from wandb.sdk import wandb_setup
        from wandb.sdk.lib.wbauth import authenticate

        settings = wandb_setup.singleton().settings
        if settings.mode in ("offline", "dryrun", "disabled"):
            return
        auth = authenticate.authenticate_session(host=settings.base_url, source="higgs-accel", prompt=False,
                                                 update_session=False)
    except (ImportError, AttributeError, TypeError):  # another wandb version: wandb.init will say it itself
        return
    except Exception as e:  # noqa: BLE001 - wandb refuses the credentials it found (e.g. a malformed key)
        raise ConfigError(f"'log.log_with': wandb cannot log in ({first_line(e) or type(e).__name__})") from None
    if auth is None and not (sys.stdin.isatty() and sys.stderr.isatty()):  # on a terminal wandb asks
        raise ConfigError("'log.log_with': wandb is not logged in and has no terminal to ask on (run `wandb "
                          "login`, set WANDB_API_KEY, or log offline with WANDB_MODE=offline)")
