"""raylm's DPO loss against TRL's own DPOTrainer._compute_loss on the same inputs.

TRL's method is called unbound on a stand-in ``self`` carrying exactly the attributes it
reads; ``accelerator.gather*`` are the identity (one process), which is what accelerate
does on a single process. The model, the token ids, masks and reference log-probs are real
and shared, so any difference in log-prob extraction, masking, shifting or the sigmoid
loss shows up.
"""

from __future__ import annotations

import collections
import types

import pytest
import torch

from raylm.train.objectives import dpo_loss, pair_batch, sequence_logps


def _trl_self(model, beta: float) -> types.SimpleNamespace:
    identity = lambda x: x  # noqa: E731
    return types.SimpleNamespace(
        model=model,
        ref_model=None,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=identity, gather=identity
        ),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=["sigmoid"],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
        args=types.SimpleNamespace(gradient_checkpointing_kwargs=None),
    )


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(tiny_model, beta: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.dpo_trainer import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from raylm.data.tokenize import tokenize_preference

    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    prompts = [
        ([{"role": "user", "content": "What color is the sky?"}], "It is blue.", "Green, I think."),
        ([{"role": "user", "content": "Name a pet."}], "A cat.", "The number seven is odd."),
    ]
    rows = [tokenize_preference(p, c, r, tok, 64) for p, c, r in prompts]
    batch = pair_batch(rows, tok.pad_token_id)
    ref_chosen = torch.tensor([-40.0, -35.5], dtype=torch.float64).float()
    ref_rejected = torch.tensor([-42.25, -31.0]).float()

    with torch.no_grad():
        chosen, rejected = sequence_logps(model, batch).chunk(2)
        ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)

    add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    inputs = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "completion_mask": batch["loss_mask"],
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }
    with torch.no_grad():
        theirs = DPOTrainer._compute_loss(_trl_self(model, beta), model, inputs, False)
    assert float(ours) == pytest.approx(float(theirs), abs=1e-6)
    assert float(ours) > 0


def test_dpo_loss_prefers_chosen() -> None:
    """The loss falls as the policy's margin for the chosen answer grows."""
    ref = torch.zeros(1)
    low = dpo_loss(torch.tensor([-1.0]), torch.tensor([-1.0]), ref, ref, beta=0.1)
    high = dpo_loss(torch.tensor([0.0]), torch.tensor([-5.0]), ref, ref, beta=0.1)
    assert float(low) == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-7)
    assert high < low
