"""Clipping counted by the daemon equals what the HF Trainer logs, against a real daemon.

A tiny GPT-2 (built from a config, every parameter trained, the whole model the host group)
with ``max_grad_norm=1.0`` and a learning rate at which the logged ``grad_norm`` starts near
2 and falls below 1 within the run, so some steps clip and some do not. The callback takes
the threshold from ``max_grad_norm``; the daemon counts the captures whose model norm
exceeded it, and that count must be the number of steps whose logged ``grad_norm`` did.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon_support import get  # noqa: E402
from trainer_support import tiny_gpt2, token_batches  # noqa: E402

from esper_telemetry.integrations.transformers import EsperCallback  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 32
RUN = "hf-clipping"


def test_clipped_count_is_the_steps_whose_logged_grad_norm_exceeded_max_grad_norm(daemon, tmp_path):
    model = tiny_gpt2(0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=2,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    esper = EsperCallback(host="transformer", run=RUN, endpoint=daemon.endpoint)
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=token_batches(2 * STEPS, seed=3)
    )
    trainer.add_callback(esper)
    trainer.train()

    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(logged) == STEPS
    clipped = sum(g > 1.0 for g in logged)
    # Both kinds of step, none within float32 rounding of the threshold.
    assert 0 < clipped < STEPS, logged
    assert min(abs(g - 1.0) for g in logged) > 1e-4, logged

    samples = daemon.scrape_until(
        lambda s: get(s, "esper_model_steps_total", run=RUN) == STEPS,
        f"{STEPS} complete steps in the daemon",
    )
    assert get(samples, "esper_grad_clip_threshold", run=RUN) == 1.0
    assert get(samples, "esper_grad_clipped_total", run=RUN) == clipped
    # The model norm is the Trainer's grad_norm (the host group is the whole model).
    assert get(samples, "esper_model_grad_norm", run=RUN) == pytest.approx(logged[-1], rel=1e-5)
    print(f"\n{clipped} of {STEPS} steps clipped at 1.0 (logged grad_norm {logged})")
