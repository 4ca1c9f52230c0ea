"""``EsperCallback`` in a real Lightning ``Trainer``, against a real daemon process.

A tiny LightningModule: a small MLP with LoRA adapters (peft on a plain torch model), the
base frozen, trained for 4 optimizer steps of 2 accumulated batches each, with gradient
clipping small enough to change the gradients. The reference is taken in the
LightningModule's own ``on_before_optimizer_step`` (Lightning calls it right after the
callbacks', before clipping), in float64; the daemon's ``esper_grad_norm`` must equal it at
every optimizer step, one capture per optimizer step.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
L = pytest.importorskip("lightning.pytorch")
peft = pytest.importorskip("peft")
from daemon_support import get  # noqa: E402
from torch import nn  # noqa: E402
from trainer_support import sq64  # noqa: E402

import esper_telemetry as et  # noqa: E402
from esper_telemetry.integrations.lightning import EsperCallback  # noqa: E402

pytestmark = pytest.mark.slow

STEPS = 4
ACCUMULATE = 2
CLIP = 1e-3
REL = 1e-5
RUN = "lightning-lora"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.fc2 = nn.Linear(24, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


class LoraModule(L.LightningModule):
    """Records float64 squares of each group at ``on_before_optimizer_step``, and after clipping."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = peft.LoraConfig(
            r=2,
            lora_alpha=4,
            target_modules=["fc1", "fc2"],
            lora_dropout=0.0,
            init_lora_weights=False,
        )
        self.net = peft.get_peft_model(MLP(), config)
        self.groups: dict[str, list[torch.Tensor]] = {"host": [], "default": []}
        for name, p in self.named_parameters():
            self.groups["default" if ".lora_" in name else "host"].append(p)
        self.pre: dict[int, dict[str, float | None]] = {}
        self.post: dict[int, float] = {}
        self.batches = 0

    def training_step(self, batch, batch_idx):
        self.batches += 1
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        self.pre[self.trainer.global_step] = {n: sq64(ps) for n, ps in self.groups.items()}

    def configure_gradient_clipping(
        self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None
    ):
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        self.post[self.trainer.global_step] = sq64(self.groups["default"])

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(STEPS * ACCUMULATE * 4, 12, generator=g)
        y = torch.randint(0, 3, (x.shape[0],), generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)


class Scraper(L.Callback):
    """After every optimizer step: flush the collector and scrape the daemon for that step."""

    def __init__(self, esper: EsperCallback, daemon) -> None:
        self.esper, self.daemon = esper, daemon
        self.scrapes: dict[int, dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step - 1  # the capture of the step just taken
        if step < 0 or step in self.scrapes:
            return
        assert self.esper.telemetry.flush(5.0), self.esper.telemetry.stats()
        self.scrapes[step] = self.daemon.scrape_until(
            lambda s: get(s, "esper_last_step", run=RUN) == step, f"step {step} in the daemon"
        )


def test_lightning_callback_exports_each_optimizer_steps_final_gradients(daemon):
    module = LoraModule()
    esper = EsperCallback(**et.peft_groups(module), run=RUN, endpoint=daemon.endpoint)
    scraper = Scraper(esper, daemon)
    trainer = L.Trainer(
        max_steps=STEPS,
        accumulate_grad_batches=ACCUMULATE,
        gradient_clip_val=CLIP,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[scraper, esper],
    )
    trainer.fit(module)

    assert trainer.global_step == STEPS and module.batches == STEPS * ACCUMULATE
    assert sorted(module.pre) == sorted(scraper.scrapes) == list(range(STEPS))
    for step, samples in scraper.scrapes.items():
        ref = module.pre[step]
        assert get(samples, "esper_captures_total", run=RUN) == step + 1
        got = get(samples, "esper_grad_norm", run=RUN, group="default")
        assert got == pytest.approx(math.sqrt(ref["default"]), rel=REL), step
        # Lightning clipped after the capture point; a capture after clipping would differ.
        assert module.post[step] < 0.5 * ref["default"], (step, module.post[step], ref["default"])
        assert ref["host"] is None
        assert get(samples, "esper_group_has_gradient", run=RUN, group="host") == 0
        assert get(samples, "esper_isolation_ok", run=RUN, group="host") == 1
        assert (
            get(samples, "esper_isolation_violations_total", run=RUN, group="host", kind="gradient")
            == 0
        )
    last = scraper.scrapes[STEPS - 1]
    for name, ps in module.groups.items():
        assert get(last, "esper_group_parameters", run=RUN, group=name) == sum(
            p.numel() for p in ps
        )

    assert esper.telemetry is None  # closed on train end: the daemon ends the run
    daemon.scrape_until(lambda s: get(s, "esper_daemon_ended_runs_total") == 1, "the run to end")


def test_a_failing_fit_closes_the_collector(daemon):
    class Failing(LoraModule):
        def training_step(self, batch, batch_idx):
            if self.trainer.global_step == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    module = Failing()
    esper = EsperCallback(**et.peft_groups(module), run="lightning-fails", endpoint=daemon.endpoint)
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[esper],
    )
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(module)
    assert esper.telemetry is None
    daemon.scrape_until(
        lambda s: get(s, "esper_daemon_ended_runs_total") == 1, "the failed run to end"
    )
