"""``EsperCallback`` in the real ``transformers.Trainer``, against a real daemon process.

A tiny GPT-2 (built from a config) with LoRA, trained for 4 optimizer steps of 2
micro-batches each. The Trainer clips to a small ``max_grad_norm`` so clipped and unclipped
gradients differ: the reference is taken where the gradients are final (on entry to the
accelerator's ``clip_grad_norm_``, which on CPU float32 has nothing to unscale), in float64,
and the daemon's ``esper_grad_norm`` must equal it at every optimizer step, with one capture
per optimizer step, not per micro-batch.
"""

from __future__ import annotations

import math
import re

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from daemon_support import get  # noqa: E402
from trainer_support import sq64, tiny_lora_gpt2, token_batches  # noqa: E402

import esper_telemetry as et  # noqa: E402
from esper_telemetry.integrations.transformers import EsperCallback  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 4
ACCUMULATE = 2
MAX_GRAD_NORM = 0.01
REL = 1e-5


def training_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    kw = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=ACCUMULATE,
        learning_rate=1e-2,
        max_grad_norm=MAX_GRAD_NORM,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def expected_groups(model, per_module: bool) -> dict[str, list[torch.Tensor]]:
    """The groups as a person reads the model's parameter names (independent of peft_groups)."""
    groups: dict[str, list[torch.Tensor]] = {"host": []}
    for name, p in model.named_parameters():
        m = re.match(r"base_model\.model\.(.+)\.lora_[AB]\.default\.weight$", name)
        if m is None:
            groups["host"].append(p)
        else:
            groups.setdefault(f"default:{m.group(1)}" if per_module else "default", []).append(p)
    return groups


class Recorder(transformers.TrainerCallback):
    """References at the capture point, and a scrape of the daemon after every optimizer step."""

    def __init__(
        self, trainer, esper: EsperCallback, daemon, run: str, groups, scrape: bool = True
    ) -> None:
        self.esper, self.daemon, self.run, self.groups, self.scrape = (
            esper,
            daemon,
            run,
            groups,
            scrape,
        )
        self.pre: dict[int, dict[str, float | None]] = {}  # step -> group -> float64 squares
        self.post: dict[int, float] = {}  # step -> adapters' squares, clipped
        self.scrapes: dict[int, dict] = {}
        self.latest: dict[int, float] = {}  # captured step -> adapters' squares
        self.micro_batches = 0
        self.state = None
        accelerator = trainer.accelerator
        original = accelerator.clip_grad_norm_

        def clip_grad_norm_(*args, **kwargs):
            if accelerator.sync_gradients:
                step = self.state.global_step + 1
                assert step not in self.pre, f"clip_grad_norm_ twice in step {step}"
                self.pre[step] = {name: sq64(ps) for name, ps in self.groups.items()}
            return original(*args, **kwargs)

        accelerator.clip_grad_norm_ = clip_grad_norm_

    def on_train_begin(self, args, state, control, **kwargs):
        self.state = state

    def on_substep_end(self, args, state, control, **kwargs):
        self.micro_batches += 1

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.micro_batches += 1
        adapters = [p for name, ps in self.groups.items() if name != "host" for p in ps]
        self.post[state.global_step + 1] = sq64(adapters)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        tel = self.esper.telemetry
        assert tel.flush(5.0), tel.stats()
        latest = tel.latest()
        if latest is not None and latest.step == step:
            self.latest[step] = sum(g.sq for g in latest.groups.values() if g.role == "seed")
        if not self.scrape:
            return
        self.scrapes[step] = self.daemon.scrape_until(
            lambda s: get(s, "esper_last_step", run=self.run) == step, f"step {step} in the daemon"
        )


@pytest.mark.parametrize("per_module", [False, True], ids=["per_adapter", "per_module"])
def test_trainer_callback_exports_each_optimizer_steps_final_gradients(
    daemon, tmp_path, per_module
):
    model = tiny_lora_gpt2()
    groups = expected_groups(model, per_module)
    run = f"hf-{'module' if per_module else 'adapter'}"
    esper = EsperCallback(
        **et.peft_groups(model, per_module=per_module), run=run, endpoint=daemon.endpoint
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=token_batches(STEPS * ACCUMULATE * 2),
    )
    recorder = Recorder(trainer, esper, daemon, run, groups)
    # The recorder goes first: at each step's end it scrapes what the callback captured.
    trainer.add_callback(recorder)
    trainer.add_callback(esper)
    trainer.train()

    assert trainer.state.global_step == STEPS and recorder.micro_batches == STEPS * ACCUMULATE
    assert sorted(recorder.pre) == sorted(recorder.scrapes) == list(range(1, STEPS + 1))
    assert esper.capture_point == "unscale_gradients"
    seeds = sorted(n for n in groups if n != "host")
    assert len(seeds) == (2 if per_module else 1)
    for step, samples in recorder.scrapes.items():
        # One capture per optimizer step, numbered as the Trainer logs it.
        assert get(samples, "esper_captures_total", run=run) == step
        ref = recorder.pre[step]
        for name in seeds:
            got = get(samples, "esper_grad_norm", run=run, group=name)
            assert got == pytest.approx(math.sqrt(ref[name]), rel=REL), (step, name)
        # The clipping that follows the capture point is real: a capture after it would differ.
        total = sum(ref[name] for name in seeds)
        assert recorder.post[step] < 0.5 * total, (step, recorder.post[step], total)
        # The frozen base: no gradient, declared isolated, no violation.
        assert ref["host"] is None
        assert get(samples, "esper_group_has_gradient", run=run, group="host") == 0
        assert get(samples, "esper_grad_norm", run=run, group="host") is None
        assert get(samples, "esper_isolation_ok", run=run, group="host") == 1
        for kind in ("gradient", "structural"):
            assert (
                get(samples, "esper_isolation_violations_total", run=run, group="host", kind=kind)
                == 0
            )
    last = recorder.scrapes[STEPS]
    for name, ps in groups.items():
        assert get(last, "esper_group_parameters", run=run, group=name) == sum(
            p.numel() for p in ps
        ), name

    # Closed on train end: the collector said goodbye, so the daemon ended the run (and
    # keeps its final values for the ended-run retention, marked ended).
    assert esper.telemetry is None
    daemon.scrape_until(
        lambda s: (
            get(s, "esper_daemon_ended_runs_total") == 1 and get(s, "esper_run_ended", run=run) == 1
        ),
        "the run to end",
    )


def test_without_clipping_every_second_step_is_captured_unclipped(daemon, tmp_path):
    """``max_grad_norm=0``: the Trainer still unscales (to measure its own grad_norm) first."""
    model = tiny_lora_gpt2(seed=1)
    groups = expected_groups(model, per_module=False)
    esper = EsperCallback(
        **et.peft_groups(model), run="hf-noclip", endpoint=daemon.endpoint, every=2
    )
    trainer = transformers.Trainer(
        model=model,
        args=training_args(tmp_path, max_grad_norm=0.0),
        train_dataset=token_batches(STEPS * ACCUMULATE * 2, seed=1),
    )
    recorder = Recorder(trainer, esper, daemon, "hf-noclip", groups, scrape=False)
    trainer.add_callback(recorder)
    trainer.add_callback(esper)
    trainer.train()

    assert esper.capture_point == "unscale_gradients"
    # every=2: steps 2 and 4, each seen by the collector right after its own step.
    assert sorted(recorder.latest) == [2, 4]
    for step, sq in recorder.latest.items():
        assert sq == pytest.approx(recorder.pre[step]["default"], rel=REL)
        assert recorder.post[step] == pytest.approx(recorder.pre[step]["default"], rel=1e-12)


def test_unknown_or_refused_arguments_raise_when_the_callback_is_made():
    with pytest.raises(TypeError, match="hosts"):
        EsperCallback(hosts="transformer")
    with pytest.raises(TypeError, match="optimizer= is not taken"):
        EsperCallback(host="transformer", optimizer=object())
    with pytest.raises(ValueError, match="every must be >= 1"):
        EsperCallback(host="transformer", every=0)
