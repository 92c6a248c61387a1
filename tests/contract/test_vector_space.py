from service.contract.registry import valid_model_id
from service.contract.variants import FP32, split_vector_space, vector_space


def test_fp32_space_is_the_bare_model_id() -> None:
    assert vector_space("m-1") == "m-1" == vector_space("m-1", FP32)


def test_spaces_round_trip_and_differ_per_variant() -> None:
    spaces = {vector_space("m-1", v) for v in (FP32, "int8", "fp16")}
    assert len(spaces) == 3
    for v in (FP32, "int8", "fp16"):
        assert split_vector_space(vector_space("m-1", v)) == ("m-1", v)


def test_a_variant_space_is_never_a_valid_model_id() -> None:
    """So a variant's vectors can never be taken for another model's."""
    assert not valid_model_id(vector_space("m-1", "int8"))
