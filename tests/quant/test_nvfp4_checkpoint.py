"""NVFP4 checkpoints (`hybridmoe quantize`, `hybridmoe.quant.{export,layout,modules}`, the loader in
`hybridmoe.checkpoint`) on test_server's checkpoint: the `debug` preset ("M*EM-E", one MTP layer) with random weights
and a small BPE tokenizer.

In "M*EM-E" the defaults keep layer 0's Mamba projections (it feeds the attention layer 1), the attention
projections, the latent projections, the MTP layer and the LM head in BF16, and quantize the rest: layer 3's Mamba
projections, layer 4's MLP, the shared experts and the routed experts of layers 2 and 5.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_server import make_checkpoint

from hybridmoe import HybridMoEForCausalLM
from hybridmoe.checkpoint import checkpoint_tensors
from hybridmoe.cli import main
from hybridmoe.data.tokenizer import load_tokenizer
from hybridmoe.quant import nvfp4
from hybridmoe.quant.modules import NVFP4Experts, NVFP4Linear, dequantize_model, weight_bytes
from hybridmoe.serve import Engine, SamplingParams
from hybridmoe.serve.server import OpenAIServing, ServerThread
from hybridmoe.serve.speculative import speculative_generate

QUANTIZED_LINEARS = [
    "backbone.layers.2.mixer.shared_experts.up_proj", "backbone.layers.2.mixer.shared_experts.down_proj",
    "backbone.layers.3.mixer.in_proj", "backbone.layers.3.mixer.out_proj",
    "backbone.layers.4.mixer.up_proj", "backbone.layers.4.mixer.down_proj",
    "backbone.layers.5.mixer.shared_experts.up_proj", "backbone.layers.5.mixer.shared_experts.down_proj",
]  # fmt: skip
QUANTIZED_EXPERTS = ["backbone.layers.2.mixer.experts", "backbone.layers.5.mixer.experts"]
PACKED = {"weight": torch.uint8, "weight_scale": torch.float8_e4m3fn, "weight_scale_2": torch.float32,
          "input_scale": torch.float32}  # fmt: skip


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bf16"), mtp=True)


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("q") / "nvfp4")
    assert main(["quantize", source, "--output", out, "--calibration-tokens", "512", "--seq-len", "128"]) == 0
    return out


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path, obj) -> None:
    Path(path).write_text(json.dumps(obj))


def read_all(path: str) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def quantized_weights(model) -> dict[str, torch.Tensor]:
    """The (out, in) weights the export quantizes, by their checkpoint module name (one entry per expert)."""
    out = {name: model.get_submodule(name).weight for name in QUANTIZED_LINEARS}
    for name in QUANTIZED_EXPERTS:
        experts = model.get_submodule(name)
        for e in range(experts.up_proj.shape[0]):
            out[f"{name}.{e}.up_proj"], out[f"{name}.{e}.down_proj"] = experts.up_proj[e], experts.down_proj[e]
    return out


def dequantized_reference(source: str, dtype: torch.dtype) -> HybridMoEForCausalLM:
    """The source model stored in BF16 and computing in `dtype`, with each quantized weight replaced by
    nvfp4.dequantize(nvfp4.quantize(w), dtype)."""
    fp32 = HybridMoEForCausalLM.from_pretrained(source, dtype=torch.float32)
    ref = HybridMoEForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    if dtype != torch.bfloat16:
        ref.to(dtype)
    with torch.no_grad():
        for name, w in quantized_weights(fp32).items():
            target = quantized_weights(ref)[name]
            target.copy_(nvfp4.dequantize(nvfp4.quantize(w, block="1x16"), dtype))
    return ref


# ------------------------------------------------------------------------------------------------ export
def test_export_writes_the_modelopt_layout(source, quantized):
    src, out = read_all(source), read_all(quantized)
    expected = {}
    for key, tensor in src.items():
        module = key.removesuffix(".weight")
        expert = ".".join(module.split(".")[:-2])  # experts.{e}.{proj} -> the experts module
        if module in QUANTIZED_LINEARS or expert in QUANTIZED_EXPERTS:
            o, i = tensor.shape
            shapes = {"weight": (o, i // 2), "weight_scale": (o, i // 16), "weight_scale_2": (), "input_scale": ()}
            for name, shape in shapes.items():
                expected[f"{module}.{name}"] = (PACKED[name], shape)
        else:
            dtype = torch.float32 if ".mixer.gate." in key else torch.bfloat16
            expected[key] = (dtype, tuple(tensor.shape))
    assert {k: (t.dtype, tuple(t.shape)) for k, t in out.items()} == expected
    assert "backbone.layers.5.mixer.experts.7.down_proj.weight_scale_2" in out  # the published per-expert names

    hf = read_json(os.path.join(quantized, "hf_quant_config.json"))
    q = hf["quantization"]
    assert (q["quant_algo"], q["group_size"], q["kv_cache_quant_algo"]) == ("NVFP4", 16, None)
    assert hf["producer"]["name"] == "hybridmoe"
    config = read_json(os.path.join(quantized, "config.json"))
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["quant_algo"], qc["group_size"]) == ("modelopt", "NVFP4", 16)
    assert qc["exclude_modules"] == qc["ignore"] == q["exclude_modules"]
    for name in ("lm_head", "mtp.*", "backbone.layers.1.mixer.q_proj", "backbone.layers.0.mixer.in_proj"):
        assert name in q["exclude_modules"]
    assert config["dtype"] == "bfloat16"
    for name in ("tokenizer.json", "tokenizer_config.json"):  # everything else is copied
        assert Path(quantized, name).read_bytes() == Path(source, name).read_bytes()
    assert not [f for f in os.listdir(os.path.dirname(quantized)) if f.endswith(".tmp")]  # the temp dir was renamed


def test_packed_codes_and_scales_are_nvfp4_quantize_of_the_weights(source, quantized):
    out = read_all(quantized)
    for name, w in quantized_weights(HybridMoEForCausalLM.from_pretrained(source, dtype=torch.float32)).items():
        t = nvfp4.quantize(w, block="1x16")
        assert torch.equal(nvfp4.unpack(out[f"{name}.weight"]), nvfp4.unpack(t.codes)), name
        assert torch.equal(out[f"{name}.weight_scale"].view(torch.uint8), t.scales.view(torch.uint8)), name
        assert torch.equal(out[f"{name}.weight_scale_2"], t.global_scale), name
        assert out[f"{name}.input_scale"] > 0
        stored = nvfp4.NVFP4Tensor(out[f"{name}.weight"], out[f"{name}.weight_scale"], out[f"{name}.weight_scale_2"],
                                   w.shape)  # fmt: skip
        assert torch.equal(nvfp4.dequantize(stored), nvfp4.dequantize(t)), name


def test_input_scale_is_the_calibrated_amax_over_2688(source, tmp_path):
    """A hook on the BF16 model's layer sees the same inputs the export's calibration saw (same windows)."""
    out = str(tmp_path / "q")
    assert main(["quantize", source, "--output", out, "--calibration-tokens", "100", "--seq-len", "50"]) == 0
    from hybridmoe.quant.export import calibration_windows

    model = HybridMoEForCausalLM.from_pretrained(source, dtype=torch.float32)
    seen = []
    model.backbone.layers[3].mixer.out_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax()))
    for w in calibration_windows(load_tokenizer(source), None, 50, 100):
        model(w[None], logits_to_keep=1)
    assert len(seen) == 2
    got = read_all(out)["backbone.layers.3.mixer.out_proj.input_scale"]
    assert got == torch.stack(seen).max() / 2688


# ------------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_model_equals_the_dequantized_bf16_model(source, quantized, dtype):
    packed = HybridMoEForCausalLM.from_pretrained(quantized, dtype=dtype)
    assert sorted(n for n, m in packed.named_modules() if isinstance(m, NVFP4Linear)) == sorted(QUANTIZED_LINEARS)
    assert sorted(n for n, m in packed.named_modules() if isinstance(m, NVFP4Experts)) == QUANTIZED_EXPERTS
    ref = dequantized_reference(source, dtype)
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, ref(ids).logits)
        # decoding through the cache, token by token, and the MTP layer (kept in BF16) too
        assert torch.equal(
            packed.generate(ids[:1, :9], max_new_tokens=12), ref.generate(ids[:1, :9], max_new_tokens=12)
        )
        assert torch.equal(packed(ids, labels=ids).loss, ref(ids, labels=ids).loss)


def test_resident_weight_bytes_drop_3_5x(quantized):
    packed = HybridMoEForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
    sizes = weight_bytes(packed)
    bf16 = 2 * sum(w.numel() for w in quantized_weights(dequantize_model(packed)).values())
    assert 3.4 < bf16 / sizes["quantized"] < 3.56  # 2 bytes vs 0.5 + 1/16 bytes per weight, plus the fp32 scalars


def test_packed_model_saves_back_to_the_same_layout(quantized, tmp_path):
    packed = HybridMoEForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
    packed.save_pretrained(tmp_path)
    a, b = read_all(quantized), read_all(str(tmp_path))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k
    assert read_json(tmp_path / "hf_quant_config.json") == read_json(f"{quantized}/hf_quant_config.json")
    # dequantized, it is an ordinary BF16 model again: trainable, saved without the quantization config
    dequantize_model(packed).save_pretrained(tmp_path / "bf16")
    assert not (tmp_path / "bf16" / "hf_quant_config.json").exists()
    assert "quantization_config" not in read_json(tmp_path / "bf16" / "config.json")


def test_training_a_packed_model_is_refused(quantized):
    packed = HybridMoEForCausalLM.from_pretrained(quantized).train()
    ids = torch.randint(0, 300, (1, 16))
    with pytest.raises(RuntimeError, match="inference only"):
        packed(ids, labels=ids)
    dequantize_model(packed)(ids, labels=ids).loss.backward()  # the way out the message names
    assert packed.backbone.layers[3].mixer.in_proj.weight.grad is not None


def write_published_layout(path, source: str) -> HybridMoEForCausalLM:
    """A directory as ModelOpt writes it, by hand: hf_quant_config.json only (no quantization_config in config.json),
    an exclude list that quantizes attention and the latent projections too (only the head and MTP excluded),
    scalar scales of shape [1], an FP8 KV cache with its k/v scales. Returns the matching dequantized model."""
    os.makedirs(path)
    model = HybridMoEForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    tensors = {k: v.clone() for k, v in checkpoint_tensors(model).items()}
    for key in list(tensors):
        module = key.removesuffix(".weight")
        if not key.endswith(".weight") or tensors[key].dim() != 2 or module.startswith(("mtp.", "lm_head")):
            continue
        if "embeddings" in key or ".gate." in key or "conv1d" in key:
            continue
        t = nvfp4.quantize(tensors[key].float(), block="1x16")
        tensors[key] = t.codes
        tensors[f"{module}.weight_scale"] = t.scales
        tensors[f"{module}.weight_scale_2"] = t.global_scale.reshape(1)
        tensors[f"{module}.input_scale"] = torch.tensor([0.01])
        with torch.no_grad():
            dequantized = nvfp4.dequantize(t, torch.bfloat16)
            name, e, proj = (module.rsplit(".", 2) + [None])[:3] if ".experts." in module else (module, None, None)
            if e is None:
                model.get_submodule(module).weight.copy_(dequantized)
            else:
                getattr(model.get_submodule(name), proj)[int(e)].copy_(dequantized)
    tensors["backbone.layers.1.mixer.k_proj.k_scale"] = torch.tensor(1.0)
    tensors["backbone.layers.1.mixer.v_proj.v_scale"] = torch.tensor(1.0)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    config = read_json(os.path.join(source, "config.json"))
    write_json(os.path.join(path, "config.json"), config)
    hf = {"producer": {"name": "modelopt", "version": "0.29.0"},
          "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": "FP8", "group_size": 16,
                           "exclude_modules": ["lm_head", "mtp*"]}}  # fmt: skip
    write_json(os.path.join(path, "hf_quant_config.json"), hf)
    return model


def test_published_layout_loads(source, tmp_path):
    ref = write_published_layout(tmp_path / "published", source)
    packed = HybridMoEForCausalLM.from_pretrained(tmp_path / "published", dtype=torch.bfloat16)
    assert isinstance(packed.backbone.layers[1].mixer.q_proj, NVFP4Linear)
    assert isinstance(packed.backbone.layers[2].mixer.fc1_latent_proj, NVFP4Linear)
    assert not isinstance(packed.mtp.layers[0].mixer.q_proj, NVFP4Linear)
    assert packed.backbone.layers[3].mixer.in_proj.input_scale.shape == ()
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(packed(ids).logits, ref(ids).logits)


# ------------------------------------------------------------------------------------------------ bad inputs
def edit(path, drop=(), retype=None):
    tensors = read_all(str(path))
    for key in drop:
        del tensors[key]
    for key, dtype in (retype or {}).items():
        tensors[key] = tensors[key].to(dtype)
    save_file(tensors, os.path.join(path, "model.safetensors"))


def copy_of(quantized, tmp_path):
    import shutil

    return shutil.copytree(quantized, tmp_path / "copy")


def test_missing_weight_scale_is_named(quantized, tmp_path):
    path = copy_of(quantized, tmp_path)
    edit(path, drop=["backbone.layers.3.mixer.in_proj.weight_scale"])
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*in_proj\.weight_scale.*weight_scale_2 and input_scale"):
        HybridMoEForCausalLM.from_pretrained(path)


def test_wrong_dtype_is_named(quantized, tmp_path):
    path = copy_of(quantized, tmp_path)
    edit(path, retype={"backbone.layers.5.mixer.experts.3.up_proj.weight_scale": torch.float32})
    with pytest.raises(
        ValueError, match=r"experts\.3\.up_proj\.weight_scale' is torch.float32 but .* stores it as torch.float8_e4m3fn"
    ):
        HybridMoEForCausalLM.from_pretrained(path)


def test_unknown_or_inconsistent_quantization_config(quantized, tmp_path):
    path = copy_of(quantized, tmp_path)
    hf_file = path / "hf_quant_config.json"
    hf = read_json(hf_file)
    hf["quantization"]["quant_algo"] = "FP8"
    write_json(hf_file, hf)
    with pytest.raises(ValueError, match="quant_algo 'FP8' is not supported"):
        HybridMoEForCausalLM.from_pretrained(path)
    hf["quantization"].update(quant_algo="NVFP4", exclude_modules=["lm_head"])
    write_json(hf_file, hf)
    with pytest.raises(ValueError, match="exclude different modules"):
        HybridMoEForCausalLM.from_pretrained(path)
    os.unlink(hf_file)  # config.json's quantization_config alone is enough
    assert isinstance(HybridMoEForCausalLM.from_pretrained(path).backbone.layers[3].mixer.in_proj, NVFP4Linear)
    config = read_json(path / "config.json")
    excludes = config["quantization_config"]["exclude_modules"] + ["backbone.layers.3.mixer.*"]
    config["quantization_config"].update(exclude_modules=excludes, ignore=excludes)
    write_json(path / "config.json", config)
    with pytest.raises(ValueError, match=r"layers\.3\.mixer\.in_proj\.\w+' is an NVFP4 tensor .* keeps unquantized"):
        HybridMoEForCausalLM.from_pretrained(path)
    del config["quantization_config"]
    write_json(path / "config.json", config)
    with pytest.raises(ValueError, match="belongs to a quantized checkpoint"):
        HybridMoEForCausalLM.from_pretrained(path)


def test_quantize_refuses_bad_arguments(source, quantized, tmp_path, capsys):
    assert main(["quantize", source, "--output", quantized]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert main(["quantize", quantized, "--output", str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    args = ["quantize", source, "--output", str(tmp_path / "x"), "--calibration-tokens", "64", "--seq-len", "32"]
    assert main([*args, "--exclude", "backbone.layers.2.mixer.experts.1.*"]) == 2
    assert "exclude all of them or none" in capsys.readouterr().err
    assert main([*args, "--calibration", str(tmp_path / "nothing.txt")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_extra_excludes_stay_bf16_and_calibration_files_are_read(source, tmp_path):
    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join(json.dumps({"text": "The weather in Paris is sunny. " * 8}) for _ in range(4)) + "\n")
    out = tmp_path / "q"
    args = ["quantize", source, "--output", str(out), "--calibration", str(data), "--exclude", "*.shared_experts.*"]
    assert main(args) == 0
    packed = HybridMoEForCausalLM.from_pretrained(out)
    assert not isinstance(packed.backbone.layers[2].mixer.shared_experts.up_proj, NVFP4Linear)
    assert isinstance(packed.backbone.layers[3].mixer.in_proj, NVFP4Linear)


# ------------------------------------------------------------------------------------------------ serving
def test_serve_answers_a_chat_request_from_a_quantized_checkpoint(quantized):
    tok = load_tokenizer(quantized)
    model = HybridMoEForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
    eos = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    engine = Engine(model, max_num_seqs=2, max_model_len=256, prefill_chunk=16, eos_token_id=eos, detokenize=tok)
    server = ServerThread(OpenAIServing(engine, tok, "nvfp4-test"))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        r = client.chat.completions.create(model="nvfp4-test", messages=messages, max_tokens=8, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens > 0
    finally:
        server.stop(grace_s=1)
    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]  # fmt: skip
    (out,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    with torch.no_grad():
        plain = model.generate(torch.tensor([prompt]), max_new_tokens=8)[0, len(prompt) :].tolist()
        assert out.token_ids == plain  # the batched engine (chunked prefill, cache slots) decodes as generate does
        spec = speculative_generate(model, prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), 2)
    assert spec.token_ids == plain  # MTP speculative decoding over packed layers keeps greedy's tokens


def test_resident_bytes_counted_on_the_meta_device_are_those_of_the_loaded_models(source, quantized):
    """benchmarks/bench_nvfp4_checkpoint.py --shapes counts the Nemotron 3 presets' weights on the meta device; on
    this checkpoint's config its counts equal those of the BF16 and NVFP4 models `from_pretrained` loads."""
    import importlib.util

    path = Path(__file__).parents[2] / "benchmarks" / "bench_nvfp4_checkpoint.py"
    spec = importlib.util.spec_from_file_location("bench_nvfp4_checkpoint", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bf16 = HybridMoEForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    packed = HybridMoEForCausalLM.from_pretrained(quantized, dtype=torch.bfloat16)
    counted = bench.weights_at_shapes(bf16.config)
    assert counted["bf16_bytes"] == weight_bytes(bf16)["total"]
    assert counted["nvfp4_bytes"] == weight_bytes(packed)["total"]
    assert counted["nvfp4_bytes_quantized_layers"] == weight_bytes(packed)["quantized"] > 0
    assert counted["parameters"] == sum(p.numel() for p in bf16.parameters())
