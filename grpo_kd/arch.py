"""The architecture facts of a causal LM from its `config.json` alone (no weights): what a memory model needs.

    facts = arch_facts(json.loads(Path("config.json").read_text()))   # or a transformers config object
    facts.text_parameters            # decoder + embeddings + an untied head, exact for the families below
    facts.kv_bytes_per_token(2)      # K and V of every layer, bf16; sliding-window layers count up to their window

Key design choice: one reader for the four families of the experiments (Llama, Mistral, Gemma-3 including its
multimodal wrapper, GPT-2 / GPT-SW3), each field taken from the config key that family uses, and the parameter
count computed from the layer shapes the transformers classes build, so that it can be checked exactly against
the tiny builds (`tests/test_arch.py`) and against published counts (LLaMA-2-7B 6,738,415,616; Mistral-7B
7,241,732,096). A vision tower (Gemma-3's SigLIP) is counted apart, in `vision_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grpo_kd.errors import GrpoKdError

FAMILY_OF = {"llama": "llama", "mistral": "llama", "gemma3": "gemma3", "gemma3_text": "gemma3", "gpt2": "gpt2"}


@dataclass(frozen=True)
class ArchFacts:
    model_type: str  # of the text model ("gemma3_text" inside a "gemma3" checkpoint)
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # embedding / LM-head rows (may exceed the tokenizer's length: padding)
    tied_embeddings: bool
    max_positions: int
    sliding_window: int | None  # tokens a sliding-window layer keeps
    sliding_layers: int  # layers with a sliding window (their KV cache stops growing at the window)
    text_parameters: int  # decoder, embeddings (and learned positions), final norm, untied head
    vision_parameters: int  # a vision tower and its projector beside the text model (0 for text-only models)

    def kv_bytes_per_token(self, bytes_per_value: float, context: int | None = None) -> float:
        """KV-cache bytes of one more token of a sequence: K and V of every layer. With `context` (the sequence's
        length), the sliding-window layers count only when the context is within their window (average per token
        over a sequence of that length)."""
        per_layer = 2 * self.num_kv_heads * self.head_dim * bytes_per_value
        full = self.num_layers - self.sliding_layers
        if context is None or self.sliding_window is None:
            return per_layer * self.num_layers
        return per_layer * (full + self.sliding_layers * min(1.0, self.sliding_window / max(context, 1)))


def _get(config: dict[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if config.get(name) is not None:
            return config[name]
    return default


def arch_facts(config: Any) -> ArchFacts:
    """ArchFacts of a config (a dict read from config.json, or a transformers config); a one-line error for a
    model type outside the families."""
    raw = _with_defaults(config)
    top_type = raw.get("model_type", "")
    text = raw.get("text_config") or raw  # the text model's settings (Gemma-3 nests them)
    model_type = text.get("model_type", top_type) if text is not raw else top_type
    family = FAMILY_OF.get(model_type) or FAMILY_OF.get(top_type)
    if family is None:
        raise GrpoKdError(f"no architecture reader for model_type {model_type or top_type!r}; known: "
                          f"{', '.join(sorted(FAMILY_OF))}")
    hidden = _get(text, "hidden_size", "n_embd")
    heads = _get(text, "num_attention_heads", "n_head")
    kv = _get(text, "num_key_value_heads", default=heads)
    head_dim = _get(text, "head_dim", default=hidden // heads)
    inner = _get(text, "intermediate_size", "n_inner", default=4 * hidden)
    layers = _get(text, "num_hidden_layers", "n_layer")
    vocab = _get(text, "vocab_size")
    tied = bool(_get(raw, "tie_word_embeddings", default=_get(text, "tie_word_embeddings", default=family == "gpt2")))
    window = _get(text, "sliding_window")
    layer_types = text.get("layer_types") or []
    sliding = sum(t == "sliding_attention" for t in layer_types) if layer_types else (layers if window else 0)
    positions = _get(text, "max_position_embeddings", "n_positions")
    if family == "gpt2":
        per_layer = 2 * 2 * hidden + (hidden * 3 * hidden + 3 * hidden) + (hidden * hidden + hidden) \
            + (hidden * inner + inner) + (inner * hidden + hidden)
        params = vocab * hidden + positions * hidden + layers * per_layer + 2 * hidden
    else:
        attn = hidden * heads * head_dim + 2 * hidden * kv * head_dim + heads * head_dim * hidden
        bias = (heads + 2 * kv) * head_dim if _get(text, "attention_bias", default=False) else 0
        norms = 4 * hidden + 2 * head_dim if family == "gemma3" else 2 * hidden  # Gemma: 4 norms + QK-norm
        per_layer = attn + bias + 3 * hidden * inner + norms
        params = vocab * hidden + layers * per_layer + hidden
    if not tied:
        params += vocab * hidden
    return ArchFacts(model_type, layers, hidden, heads, kv, head_dim, inner, vocab, tied, positions, window,
                     sliding, params, _vision_parameters(raw))


def _with_defaults(config: Any) -> dict[str, Any]:
    """The config as a dict with every default filled in (config.json files leave defaults out), through the
    transformers config class of its model_type; no network is needed."""
    if not isinstance(config, dict):
        return config.to_dict()
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    try:
        return AutoConfig.for_model(config.get("model_type", ""), **fields).to_dict()
    except ValueError as exc:
        raise GrpoKdError(f"not a model config transformers knows: {str(exc).splitlines()[0]}") from None


def _vision_parameters(raw: dict[str, Any]) -> int:
    """A SigLIP tower (Gemma-3) and the multimodal projector, from `vision_config`; 0 without one."""
    vision = raw.get("vision_config")
    if not vision:
        return 0
    h, inner, layers = vision["hidden_size"], vision["intermediate_size"], vision["num_hidden_layers"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    embed = 3 * vision["patch_size"] ** 2 * h + h + patches * h  # patch conv (with bias) + positions
    per_layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
    text_hidden = raw["text_config"]["hidden_size"]
    projector = h * text_hidden + h  # mm_input_projection_weight + mm_soft_emb_norm
    head = 0  # the attention-pooling head, which Gemma-3's tower leaves out (vision_use_head: false)
    if vision.get("vision_use_head", True):
        head = h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
    return embed + layers * per_layer + 2 * h + head + projector
