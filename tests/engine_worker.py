"""One process of tests/test_distributed.py: the trainer's own setup (model, LoRA, data, optimizer, accelerate's
prepare) under whatever engine the launcher asked for, a few optimizer steps as the loop takes them, then the
engine's gather, full-parameter forward and sharded save/load. Writes what it saw to OUT_DIR for the test to check.

Usage: python tests/engine_worker.py CONFIG_JSON OUT_DIR (under a launcher, one process per rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from higgs_accel import engine, loop
from higgs_accel.config import load_config

STEPS, RESUME_AT = 4, 2


def main(config_json: str, out_dir: str) -> None:
    out = Path(out_dir)
    cfg = load_config(None, [(k, v, "test") for k, v in json.loads(config_json).items()])
    run = loop.setup(cfg)  # engine.build_accelerator inside: FSDP2 driven deliberately on a CPU machine
    acc, model, optimizer = run.accelerator, run.model, run.optimizer
    params = [p for p in model.parameters() if p.requires_grad]
    batches = []
    for batch in run.train_loader:
        batches.append(batch)
        if len(batches) == STEPS:
            break

    norms = []

    def step(batch) -> float:
        with acc.accumulate(model):
            loss = model(batch).loss
            acc.backward(loss)
            norms.append(engine.grad_norm_tensor(acc.clip_grad_norm_(params, 1.0), acc.device).item())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        return acc.reduce(loss.detach(), "mean").item()

    model.train()
    losses = []
    for i, batch in enumerate(batches):
        if i == RESUME_AT:
            acc.save_state(str(out / "state"))
        losses.append(step(batch))
    acc.load_state(str(out / "state"), strict=False)  # DDP checkpoints hold the trainable weights only
    resumed = [step(batch) for batch in batches[RESUME_AT:]]

    shards = [{"name": n, "dtensor": isinstance(p, DTensor), "local": p.to_local().numel() if isinstance(p, DTensor)
               else p.numel(), "full": p.numel(), "mesh": p.device_mesh.size() if isinstance(p, DTensor) else 1}
              for n, p in model.named_parameters() if p.requires_grad]
    (out / f"shards-{acc.process_index}.json").write_text(json.dumps(shards))

    peft_model = acc.unwrap_model(model).peft
    adapter = engine.gather_trainable(acc, peft_model)
    engine.save_adapter(acc, peft_model, out / "adapter")
    model.eval()
    with torch.no_grad(), engine.full_parameters(acc, model):
        if acc.is_main_process:  # alone: the others hold no forward to match it
            batch = batches[0]
            lm = acc.unwrap_model(model).lm
            hidden = lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              audio_input_ids=batch["audio_input_ids"],
                              audio_input_ids_mask=batch["audio_input_ids_mask"]).last_hidden_state
            torch.save({"batch": {k: v for k, v in batch.items() if torch.is_tensor(v)},
                        "audio_logits": lm.audio_lm_head(hidden), "text_logits": lm.text_lm_head(hidden)},
                       out / "logits.pt")
    model.train()
    after = step(batches[-1])  # all processes again, after the main one ran forwards alone
    acc.wait_for_everyone()
    if acc.is_main_process:
        (out / "result.json").write_text(json.dumps({"losses": losses, "resumed": resumed, "after": after,
                                                     "grad_norms": norms[:STEPS],
                                                     "engine": engine.describe(acc),
                                                     "adapter_keys": sorted(adapter)}))
    run.log.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
