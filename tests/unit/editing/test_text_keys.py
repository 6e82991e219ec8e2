"""Tokenisation helpers and keys: subject positions, left padding, key values and shapes."""

from __future__ import annotations

import pytest
import torch

from sphere_edit.editing.keys import (
    LowerLayers,
    read_layer,
    residual_to_mlp_delta,
    template_weights,
)
from sphere_edit.editing.requests import EditRequest, RequestError
from sphere_edit.editing.text import (
    SubjectPrompt,
    encode,
    encode_subject_prompts,
    join_target,
    last_token_index,
    pad_left,
    target_token_ids,
)
from sphere_edit.model.arch import ModelLayout
from tests.tiny_models import TINY_INTERMEDIATE
from tests.unit._helpers import (
    requests_abc,
    run_single,
    subject_end_in,
    subject_last_index_by_decoding,
)

CASES = [
    ("{} is located in", "Toronto", "{}"),
    ("The mother tongue of {} is", "Marie Curie", "{}"),
    ("{} plays the", "Yo-Yo Ma", "Which instrument does he play? {}"),
    ("Where is {}? It is", "Vancouver", "{}"),  # subject followed by punctuation
    ("The {} flows through", "Seine", "The river. {}"),
    ("{} is a city", "Tor", "{}"),  # subject ends inside a word: "Tor" of a longer token
    ("People in {}, she said", "Zürich", "{}"),  # non-ASCII, multi-byte characters
]


# -- text -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "subject", "context"), CASES)
def test_last_token_index_finds_the_subjects_last_token(tiny_tokenizer, prompt, subject, context):
    request = EditRequest(prompt=prompt, subject=subject, target_new="x")
    built = SubjectPrompt.build(request, context=context)
    assert built.text[built.subject_end - len(subject) : built.subject_end] == subject
    ids = encode(tiny_tokenizer, built.text)
    index = last_token_index(tiny_tokenizer, built.text, built.subject_end)
    # Decoding the tokens up to the index reaches the end of the subject; without the token
    # at the index it does not: that token overlaps the subject's last character.
    assert len(tiny_tokenizer.decode(ids[: index + 1])) >= built.subject_end
    assert len(tiny_tokenizer.decode(ids[:index])) < built.subject_end
    assert index == subject_last_index_by_decoding(tiny_tokenizer, ids, built.subject_end)
    token_text = tiny_tokenizer.decode(ids[index : index + 1])
    assert subject[-1] in token_text or not token_text.isascii()


class _SlowShim:
    """The fast tokenizer seen as a slow one (no offsets): exercises the fallback path."""

    is_fast = False

    def __init__(self, fast):
        self._fast = fast

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self._fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


@pytest.mark.parametrize(("prompt", "subject", "context"), CASES[:5])
def test_last_token_index_slow_fallback_agrees(tiny_tokenizer, prompt, subject, context):
    request = EditRequest(prompt=prompt, subject=subject, target_new="x")
    built = SubjectPrompt.build(request, context=context)
    fast = last_token_index(tiny_tokenizer, built.text, built.subject_end)
    slow = last_token_index(_SlowShim(tiny_tokenizer), built.text, built.subject_end)
    assert slow == fast


def test_subject_prompt_build_uses_template_and_context():
    request = EditRequest.create("{} plays the", "Glenn Gould", "guitar")
    built = SubjectPrompt.build(request, context="Music. {}", template="{} is a")
    assert built.text == "Music. Glenn Gould is a"
    assert built.text[: built.subject_end].endswith("Glenn Gould")
    built = SubjectPrompt.build(request, context="A {} B")
    assert built.text == "A Glenn Gould plays the B"
    assert built.text[: built.subject_end] == "A Glenn Gould"


def test_join_target():
    assert join_target("Toronto is in", "France") == "Toronto is in France"
    assert join_target("Toronto is in ", "France") == "Toronto is in France"
    assert join_target("Toronto is in", " France") == "Toronto is in France"
    assert join_target("Toronto is in\n", "France") == "Toronto is in\nFrance"


def test_target_token_ids_in_context(tiny_tokenizer):
    ids = target_token_ids(tiny_tokenizer, "Toronto is located in", "France")
    assert tiny_tokenizer.decode(ids) == " France"
    assert ids == target_token_ids(tiny_tokenizer, "Toronto is located in", " France")
    prompt_ids = encode(tiny_tokenizer, "Toronto is located in")
    assert prompt_ids + ids == encode(tiny_tokenizer, "Toronto is located in France")


def test_target_token_ids_drops_trailing_eos(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    plain = target_token_ids(tiny_tokenizer, "Toronto is located in", "France")
    assert target_token_ids(tiny_tokenizer, "Toronto is located in", "France" + eos) == plain


def test_target_that_tokenises_to_nothing(tiny_tokenizer):
    eos = tiny_tokenizer.eos_token
    # After a trailing space the eos text is the only token of the target, and it is dropped.
    with pytest.raises(RequestError, match="tokenises to nothing") as info:
        target_token_ids(tiny_tokenizer, "Toronto is located in ", eos)
    assert info.value.field == "target_new"
    with pytest.raises(RequestError) as info:
        target_token_ids(tiny_tokenizer, "Toronto is\n", eos, field="target_true")
    assert info.value.field == "target_true"


def test_eos_target_is_nothing_even_after_the_separator_space(tiny_tokenizer):
    """Without a trailing space, only the separating space join_target inserts is left."""
    eos = tiny_tokenizer.eos_token
    with pytest.raises(RequestError, match="tokenises to nothing"):
        target_token_ids(tiny_tokenizer, "Toronto is located in", eos)
    with pytest.raises(RequestError, match="tokenises to nothing"):
        target_token_ids(tiny_tokenizer, "Toronto is located in", eos + eos)


def test_pad_left_keeps_positions_and_lookups():
    batch = pad_left([[5, 6, 7], [8], [1, 2, 3, 4, 9]], [1, 0, 3], pad_id=0, device="cpu")
    assert batch.input_ids.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8], [1, 2, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1], [1] * 5]
    # Every real token keeps the position it has when the row runs alone.
    assert batch.position_ids[0, 2:].tolist() == [0, 1, 2]
    assert batch.position_ids[1, 4:].tolist() == [0]
    assert batch.position_ids[2].tolist() == [0, 1, 2, 3, 4]
    assert batch.lookup.tolist() == [3, 4, 3]
    for row in range(3):
        assert int(batch.input_ids[row, batch.lookup[row]]) == [6, 8, 4][row]
    assert batch.lengths.tolist() == [3, 1, 5]
    assert len(batch) == 3


def test_encode_subject_prompts_with_suffixes(tiny_tokenizer):
    requests = requests_abc()
    prompts = [SubjectPrompt.build(r) for r in requests]
    batch = encode_subject_prompts(tiny_tokenizer, prompts, "cpu", suffixes=[[1, 2], [], [3]])
    for row, prompt in enumerate(prompts):
        ids = encode(tiny_tokenizer, prompt.text)
        suffix = [[1, 2], [], [3]][row]
        width = batch.input_ids.shape[1]
        real = batch.input_ids[row, width - len(ids) - len(suffix) :].tolist()
        assert real == ids + suffix
        local = last_token_index(tiny_tokenizer, prompt.text, prompt.subject_end)
        assert int(batch.lookup[row]) == width - len(ids) - len(suffix) + local


# -- keys -------------------------------------------------------------------------------------

# The last template is longer than gemma3's sliding window (16 tokens) in the tiny config.
TEMPLATES = [
    "{}",
    "The city of Paris. {}",
    "The official language of France is French. Toronto is located in Canada. {}",
]


def test_template_weights():
    assert template_weights(1).tolist() == [1.0]
    torch.testing.assert_close(template_weights(3), torch.tensor([0.5, 0.25, 0.25]))
    weights = template_weights(6)
    assert weights[0] == 0.5
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_read_layer_equals_independent_forward(tiny_model):
    """Keys are the MLP output module's input at the subject's last token, averaged over
    templates with MEMIT's weights; computed here on single unpadded prompts."""
    model, tok = tiny_model
    layout = ModelLayout.of(model)
    requests = requests_abc()
    layer, z_layer = 1, 2
    readout = read_layer(model, tok, layout, layer, z_layer, requests, TEMPLATES)
    key_dim = layout.read_weight(layer).shape[1]
    hidden = model.config.get_text_config().hidden_size
    assert key_dim == TINY_INTERMEDIATE
    assert readout.keys.shape == (len(requests), key_dim)
    assert readout.keys.dtype == torch.float32
    assert readout.mlp_out.shape == (len(requests), hidden)
    assert readout.z_out.shape == (len(requests), hidden)
    weights = [0.5, 0.25, 0.25]
    for i, request in enumerate(requests):
        expected_key = torch.zeros(key_dim)
        for t, context in enumerate(TEMPLATES):
            text = context.replace("{}", request.prompt.replace("{}", request.subject))
            subject_end = subject_end_in(context, request)
            assert text[subject_end - len(request.subject) : subject_end] == request.subject
            ids = tok(text)["input_ids"]
            index = subject_last_index_by_decoding(tok, ids, subject_end)
            key, mlp, z = run_single(model, ids, layer, z_layer)
            expected_key += weights[t] * key[index]
            if t == 0:
                torch.testing.assert_close(readout.mlp_out[i], mlp[index], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(readout.z_out[i], z[index], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(readout.keys[i], expected_key, atol=1e-5, rtol=1e-5)


def test_read_layer_padding_does_not_change_keys(tiny_model):
    model, tok = tiny_model
    layout = ModelLayout.of(model)
    requests = requests_abc()
    batched = read_layer(model, tok, layout, 2, 3, requests, TEMPLATES)
    for i, request in enumerate(requests):
        alone = read_layer(model, tok, layout, 2, 3, [request], TEMPLATES, rows_per_pass=1)
        torch.testing.assert_close(batched.keys[i], alone.keys[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.mlp_out[i], alone.mlp_out[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched.z_out[i], alone.z_out[0], atol=1e-5, rtol=1e-5)


def test_read_layer_replays_the_layers_below_the_window(tiny_model):
    model, tok = tiny_model
    layout = ModelLayout.of(model)
    requests = requests_abc()
    lower = LowerLayers(first=2)
    read_layer(model, tok, layout, 2, 3, requests, TEMPLATES, rows_per_pass=4, lower=lower)
    assert len(lower.outputs) == -(-len(requests) * len(TEMPLATES) // 4)  # one per chunk
    weight = layout.mlp_out(2).weight
    below = layout.mlp_out(0).weight
    original, original_below = weight.detach().clone(), below.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(0.1 * torch.randn_like(weight))  # an edit inside the window
        expected = read_layer(model, tok, layout, 3, 3, requests, TEMPLATES)
        with torch.no_grad():
            below.zero_()  # were layer 0 run again, every read would change
        got = read_layer(model, tok, layout, 3, 3, requests, TEMPLATES, rows_per_pass=4,
                         lower=lower)  # fmt: skip
        rerun = read_layer(model, tok, layout, 3, 3, requests, TEMPLATES)
    finally:
        with torch.no_grad():
            weight.copy_(original)
            below.copy_(original_below)
    torch.testing.assert_close(got.keys, expected.keys, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.z_out, expected.z_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.mlp_out, expected.mlp_out, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(rerun.keys, expected.keys)
    with pytest.raises(ValueError, match="below the replayed layers"):
        read_layer(model, tok, layout, 1, 3, requests, TEMPLATES, lower=lower)


def test_read_layer_with_z_layer_below_layer(tiny_model):
    model, tok = tiny_model
    layout = ModelLayout.of(model)
    requests = requests_abc()[:2]
    low = read_layer(model, tok, layout, 3, 0, requests, ["{}"])
    high = read_layer(model, tok, layout, 3, 3, requests, ["{}"])
    torch.testing.assert_close(low.keys, high.keys)
    assert not torch.allclose(low.z_out, high.z_out)


def test_read_layer_requires_bare_template_first(tiny_model):
    model, tok = tiny_model
    with pytest.raises(ValueError, match="bare prompt"):
        read_layer(model, tok, ModelLayout.of(model), 1, 2, requests_abc(), ["A. {}", "{}"])


def test_residual_to_mlp_delta_without_post_norm_is_identity(tiny_tokenizer):
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("llama", tiny_tokenizer)
    layout = ModelLayout.of(model)
    residual = torch.randn(2, 64)
    assert residual_to_mlp_delta(layout, 1, torch.randn(2, 64), residual) is residual


def test_residual_to_mlp_delta_inverts_gemma_post_norm(tiny_tokenizer):
    """With y = norm(m): no residual change asks for no MLP change; a small reachable
    (tangent) r is hit to second order; a large r gives the reachable output closest to
    y + r (no random reachable output is closer)."""
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("gemma3_text", tiny_tokenizer)
    layout = ModelLayout.of(model)
    norm = layout.post_mlp_norm(1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(0.5 * torch.randn(norm.weight.shape, generator=generator))
        m = torch.randn(3, 64, generator=generator)
        y = norm(m)
        gain = norm(torch.ones(1, 64))
        zero = residual_to_mlp_delta(layout, 1, m, torch.zeros_like(m))
        torch.testing.assert_close(zero, torch.zeros_like(m), atol=1e-5, rtol=0)

        # Remove the component of r that changes rms(y / gain): what is left is reachable.
        r = 0.1 * torch.randn(3, 64, generator=generator)
        direction = y / gain**2
        tangent = (
            r - (r * direction).sum(1, keepdim=True) / (y * direction).sum(1, keepdim=True) * y
        )
        errors = []
        for scale in (1.0, 0.1):
            step = scale * tangent
            got = norm(m + residual_to_mlp_delta(layout, 1, m, step))
            errors.append(float((got - y - step).norm()))
        # Second order: ten times smaller r, about a hundred times smaller error.
        assert errors[1] < errors[0] / 30

        wanted = y + 3.0 * torch.randn(3, 64, generator=generator)
        got = norm(m + residual_to_mlp_delta(layout, 1, m, wanted - y))
        miss = (got - wanted).norm(dim=1)
        unit = got / gain  # rms 1: a point of the reachable set
        for _ in range(200):
            other = unit + 0.05 * torch.randn(unit.shape, generator=generator)
            other = other / other.pow(2).mean(-1, keepdim=True).sqrt()
            assert torch.all((gain * other - wanted).norm(dim=1) >= miss - 1e-4)


def test_gemma_norm_inversion_leaves_zero_gain_channels_alone(tiny_tokenizer):
    """Gemma's RMSNorm scales by (1 + w): a channel with w = -1 is unreachable and must not
    turn the residual into inf (it did before, and the batch was rejected)."""
    import torch

    from sphere_edit.editing.keys import residual_to_mlp_delta
    from sphere_edit.model.arch import ModelLayout
    from tests.tiny_models import make_tiny_model

    model = make_tiny_model("gemma3_text", tiny_tokenizer)
    layout = ModelLayout.of(model)
    norm = layout.post_mlp_norm(1)
    with torch.no_grad():
        norm.weight.zero_()
        norm.weight[3] = -1.0
    mlp_out = torch.randn(2, norm.weight.shape[0])
    delta = residual_to_mlp_delta(layout, 1, mlp_out, torch.randn(2, norm.weight.shape[0]) * 1e-3)
    assert torch.isfinite(delta).all()
    assert torch.all(delta[:, 3] == 0)
