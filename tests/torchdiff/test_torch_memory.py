"""torchdiff.memory: gradient checkpointing changes nothing numerically, xFormers falls back to SDPA
with one warning wherever it cannot run, TF32 flags, gradient reset and peak memory."""

import copy
import logging
import sys
import types

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from diffusers import UNet2DConditionModel, UNet2DModel  # noqa: E402
from diffusers.models.attention_processor import (  # noqa: E402
    Attention,
    AttnAddedKVProcessor,
    AttnAddedKVProcessor2_0,
    AttnProcessor2_0,
)

from shared.config import build  # noqa: E402
from torchdiff.memory import (  # noqa: E402
    apply_memory_options,
    enable_tf32,
    peak_memory_bytes,
    zero_grad,
)

CPU = torch.device("cpu")
# Only a name: nothing is moved there, so the CUDA branch is testable on a CPU machine.
CUDA = torch.device("cuda")


def text2image_cfg(**values):
    base = {"dataset_name": "tiny", "pretrained_model_name_or_path": "tiny"}
    return build("text2image", "torch", {**base, **values})


def dreambooth_cfg(**values):
    base = {
        "pretrained_model_name_or_path": "tiny",
        "instance_data_dir": "subject",
        "instance_prompt": "a photo of sks dog",
    }
    return build("dreambooth", "torch", {**base, **values})


def tiny_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
        attention_head_dim=8,
    )


def tiny_text_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    return transformers.CLIPTextModel(config)


def unet_inputs():
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)  # (B, C, H, W) latents
    timesteps = torch.tensor([10, 500])
    encoder_hidden_states = torch.randn(2, 5, 32, generator=generator)  # (B, tokens, D)
    return sample, timesteps, encoder_hidden_states


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


def forward_calls(module) -> list:
    """A list that grows at each forward call of `module`.

    A pre-hook: a checkpoint's recompute stops as soon as it has what the backward pass needs,
    before a module's forward post-hooks would run.
    """
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def checkpointed(module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in module.modules())


# --- gradient checkpointing --------------------------------------------------------------------


def test_gradient_checkpointing_changes_no_output_or_gradient(unet):
    reference_unet, reference_te = copy.deepcopy(unet).train(), tiny_text_encoder().train()
    ckpt_unet, ckpt_te = copy.deepcopy(unet).train(), copy.deepcopy(reference_te)
    cfg = dreambooth_cfg(gradient_checkpointing=True, train_text_encoder=True)
    lines = apply_memory_options(
        cfg, unet=ckpt_unet, text_encoder=ckpt_te, train_text_encoder=True, device=CPU
    )
    assert lines == [
        "gradient checkpointing enabled on the UNet",
        "gradient checkpointing enabled on the text encoder",
    ]
    assert ckpt_unet.is_gradient_checkpointing and not reference_unet.is_gradient_checkpointing
    assert checkpointed(ckpt_te) and not checkpointed(reference_te)

    sample, timesteps, _ = unet_inputs()
    input_ids = torch.tensor([[0, 5, 17, 99, 2], [0, 42, 2, 1, 1]])
    results = []
    for model_unet, model_te in ((reference_unet, reference_te), (ckpt_unet, ckpt_te)):
        te_layer = next(m for m in model_te.modules() if type(m).__name__ == "CLIPEncoderLayer")
        unet_calls = forward_calls(model_unet.down_blocks[0].resnets[0])
        te_calls = forward_calls(te_layer.self_attn)
        # The text encoder feeds the UNet, as when it is trained: gradients flow through both.
        text_states = model_te(input_ids).last_hidden_state  # (B, 5, 32)
        out = model_unet(sample, timesteps, text_states).sample
        out.square().mean().backward()
        grads = [p.grad for p in (*model_unet.parameters(), *model_te.parameters())]
        results.append((out.detach(), grads, (len(unet_calls), len(te_calls))))
    (ref_out, ref_grads, ref_calls), (ckpt_out, ckpt_grads, ckpt_calls) = results
    # Checkpointed blocks really ran twice: once forward, once recomputed in the backward pass.
    assert ref_calls == (1, 1) and ckpt_calls == (2, 2)
    torch.testing.assert_close(ckpt_out, ref_out, rtol=0, atol=1e-6)
    assert all(g is not None for g in ref_grads)
    for ckpt_grad, ref_grad in zip(ckpt_grads, ref_grads, strict=True):
        torch.testing.assert_close(ckpt_grad, ref_grad, rtol=0, atol=1e-6)


def test_frozen_text_encoder_is_not_checkpointed(unet):
    text_encoder = tiny_text_encoder()
    cfg = dreambooth_cfg(gradient_checkpointing=True)
    lines = apply_memory_options(
        cfg, unet=copy.deepcopy(unet), text_encoder=text_encoder, device=CPU
    )
    assert lines == ["gradient checkpointing enabled on the UNet"]
    assert not checkpointed(text_encoder)


def test_no_options_change_nothing(unet):
    model = copy.deepcopy(unet)
    processors = {name: type(p) for name, p in model.attn_processors.items()}
    assert apply_memory_options(text2image_cfg(), unet=model, device=CPU) == []
    assert not model.is_gradient_checkpointing
    assert {name: type(p) for name, p in model.attn_processors.items()} == processors


# --- xFormers and its SDPA fallback ------------------------------------------------------------


def test_xformers_on_cpu_falls_back_to_sdpa_with_one_warning(unet, caplog):
    model = copy.deepcopy(unet).eval()
    with torch.no_grad():
        default_out = model(*unet_inputs()).sample
        model.set_default_attn_processor()  # diffusers' plain-matmul attention, for reference
        math_out = model(*unet_inputs()).sample

    cfg = text2image_cfg(enable_xformers_memory_efficient_attention=True)
    with caplog.at_level(logging.WARNING, logger="torchdiff.memory"):
        lines = apply_memory_options(cfg, unet=model, device=CPU)
    (line,) = lines
    assert "xFormers cannot run on cpu" in line
    assert "PyTorch scaled_dot_product_attention" in line
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [line]
    processors = model.attn_processors.values()
    assert f"in {len(processors)} attention layers" in line  # self- and cross-attention: 8
    assert all(type(p) is AttnProcessor2_0 for p in processors)
    with torch.no_grad():
        sdpa_out = model(*unet_inputs()).sample
    assert torch.equal(sdpa_out, default_out)  # SDPA is already diffusers' default on torch 2
    torch.testing.assert_close(sdpa_out, math_out, rtol=1e-5, atol=1e-6)


def test_xformers_not_installed_on_cuda_falls_back(unet, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` fail
    model = copy.deepcopy(unet)
    cfg = text2image_cfg(enable_xformers_memory_efficient_attention=True)
    (line,) = apply_memory_options(cfg, unet=model, device=CUDA)
    assert "xFormers is not installed" in line and "scaled_dot_product_attention" in line
    assert all(type(p) is AttnProcessor2_0 for p in model.attn_processors.values())


def fake_xformers(monkeypatch, version):
    module = types.ModuleType("xformers")
    module.__version__ = version
    monkeypatch.setitem(sys.modules, "xformers", module)


def test_xformers_enabled_on_cuda_and_0_0_16_warned(unet, monkeypatch):
    fake_xformers(monkeypatch, "0.0.16")
    model = copy.deepcopy(unet)
    calls = []
    monkeypatch.setattr(
        model, "enable_xformers_memory_efficient_attention", lambda: calls.append(1)
    )
    cfg = text2image_cfg(enable_xformers_memory_efficient_attention=True)
    lines = apply_memory_options(cfg, unet=model, device=CUDA)
    assert calls == [1]
    assert len(lines) == 2
    assert "xFormers 0.0.16 cannot be used for training on some GPUs" in lines[0]
    assert lines[1] == "xFormers 0.0.16 memory-efficient attention enabled on the UNet"


def test_xformers_failure_falls_back(unet, monkeypatch):
    # diffusers finds no real xFormers distribution, so enabling raises: the fallback takes over.
    fake_xformers(monkeypatch, "0.0.28")
    model = copy.deepcopy(unet)
    cfg = text2image_cfg(enable_xformers_memory_efficient_attention=True)
    (line,) = apply_memory_options(cfg, unet=model, device=CUDA)
    assert line.startswith(
        "--enable_xformers_memory_efficient_attention: enabling xFormers 0.0.28 failed"
    )
    assert all(type(p) is AttnProcessor2_0 for p in model.attn_processors.values())


def test_sdpa_fallback_on_unet2d_and_added_kv_attention():
    # UNet2DModel (unconditional) has no set_attn_processor; added-KV layers need their own kind.
    torch.manual_seed(0)
    unet2d = UNet2DModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        attention_head_dim=8,
    )
    added_kv = Attention(8, added_kv_proj_dim=8, processor=AttnAddedKVProcessor())
    container = torch.nn.ModuleList([unet2d, added_kv])
    cfg = build(
        "unconditional",
        "torch",
        {"dataset_name": "tiny", "enable_xformers_memory_efficient_attention": True},
    )
    (line,) = apply_memory_options(cfg, unet=container, device=CPU)
    attention = [m for m in unet2d.modules() if isinstance(m, Attention)]
    assert len(attention) == 4  # one down, two up, one mid-block layer
    assert f"in {len(attention) + 1} attention layers" in line
    assert all(type(m.processor) is AttnProcessor2_0 for m in attention)
    assert type(added_kv.processor) is AttnAddedKVProcessor2_0


# --- TF32, gradient reset, peak memory ---------------------------------------------------------


@pytest.fixture
def tf32_flags():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.usefixtures("tf32_flags")
def test_tf32_is_enabled_only_when_asked():
    assert enable_tf32(text2image_cfg()) == []
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert len(enable_tf32(text2image_cfg(allow_tf32=True))) == 1
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32


@pytest.mark.parametrize("to_none", [True, False])
def test_zero_grad_honours_set_grads_to_none(to_none):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    zero_grad(optimizer, text2image_cfg(set_grads_to_none=to_none))
    for p in model.parameters():
        if to_none:
            assert p.grad is None
        else:
            assert torch.equal(p.grad, torch.zeros_like(p))


def test_peak_memory_bytes_on_cpu_is_in_bytes():
    # A process that imported torch peaks far above 10 MiB; KiB read as bytes would be below.
    peak = peak_memory_bytes(CPU)
    assert isinstance(peak, int) and peak > 10 * 2**20
