"""Mixed precision: float32 master weights and moments for 16-bit trainable parameters.

A learning-rate-1e-3 AdamW step moves a weight of 1.0 by about 1e-3, under half a bfloat16 step at 1.0 (2^-8):
plain AdamW on bfloat16 parameters never moves it, the master-weight optimizer moves it as float32 would."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from grpo_kd.config import OptimConfig
from grpo_kd.train.checkpoint import model_dir, restore_checkpoint, save_checkpoint
from grpo_kd.train.optim import MasterWeightAdamW, build_optimizer


def _constant_steps(param, optimizer, steps: int) -> None:
    for _ in range(steps):
        param.grad = torch.ones_like(param)
        optimizer.step()


def test_tiny_updates_land_through_master_weights():
    plain = torch.nn.Parameter(torch.ones(4, 8, dtype=torch.bfloat16))
    mixed = torch.nn.Parameter(torch.ones(4, 8, dtype=torch.bfloat16))
    reference = torch.nn.Parameter(torch.ones(4, 8))  # float32 all the way
    plain_opt = torch.optim.AdamW([plain], lr=1e-3, weight_decay=0.0)
    mixed_opt = build_optimizer([("w", mixed)], OptimConfig(lr=1e-3))
    reference_opt = torch.optim.AdamW([reference], lr=1e-3, weight_decay=0.0, foreach=False)
    assert isinstance(mixed_opt, MasterWeightAdamW)
    for opt, param in ((plain_opt, plain), (mixed_opt, mixed), (reference_opt, reference)):
        _constant_steps(param, opt, 10)
    assert bool((plain == 1).all())  # every update rounded away
    state = mixed_opt.state[mixed]
    assert state["master"].dtype == state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert torch.equal(state["master"], reference.detach())  # float32's own trajectory, to the bit
    assert torch.equal(mixed.detach(), reference.detach().bfloat16()) and bool((mixed < 1).all())


def test_float32_parameters_keep_torch_adamw_and_its_numbers():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(37, 11))
    b = torch.nn.Parameter(a.detach().clone())
    assert type(build_optimizer([("a", a)], OptimConfig())) is torch.optim.AdamW
    torch_opt = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, foreach=False)
    ours = MasterWeightAdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(37, 11)
        a.grad, b.grad = grad.clone(), grad.clone()
        torch_opt.step()
        ours.step()
    assert torch.equal(a, b) and "master" not in ours.state[b]


def _bf16_llama(directory, seed: int = 0):
    """A tiny Llama loaded in bfloat16 as a checkpoint is (`.to(bfloat16)` would also round its rotary buffers)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    LlamaForCausalLM(cfg).save_pretrained(directory)
    return LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).train()


def _steps(model, optimizer, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, 61, (2, 7))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_master_weights_survive_a_checkpoint(tmp_path):
    """Resumed == uninterrupted: the masters come back float32 (torch would cast them to the parameters' bf16)."""
    cfg = OptimConfig(lr=1e-3)
    model = _bf16_llama(tmp_path / "initial")
    optimizer = build_optimizer(model.named_parameters(), cfg)
    _steps(model, optimizer, 3)
    save_checkpoint(tmp_path / "ck", model=model, optimizer=optimizer, state={"step": 3})
    expected = _steps(model, optimizer, 2)
    fresh = LlamaForCausalLM.from_pretrained(model_dir(tmp_path / "ck"), dtype=torch.bfloat16).train()
    fresh_opt = build_optimizer(fresh.named_parameters(), cfg)
    restore_checkpoint(tmp_path / "ck", optimizer=fresh_opt)
    masters = [s["master"] for s in fresh_opt.state.values()]
    assert masters and all(m.dtype == torch.float32 for m in masters)
    assert _steps(fresh, fresh_opt, 2) == expected
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
