import pytest

from epee import EarlyExitConfig, EngineConfig, ExitPolicyConfig


class TestExitPolicyConfig:
    def test_defaults_are_epee(self):
        cfg = ExitPolicyConfig()
        assert cfg.kind == "epee" and cfg.uses_entropy and cfg.uses_patience

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"kind": "greedy"}, r"kind \('greedy'\) must be one of"),
            ({"entropy_threshold": 1.5}, r"entropy_threshold \(1.5\) must lie in \[0, 1\]"),
            ({"entropy_threshold": float("nan")}, r"entropy_threshold"),
            ({"patience": 0}, r"patience \(0\) must be an integer >= 1"),
            ({"patience": 2.5}, r"patience \(2.5\)"),
            ({"min_exit_layer": 0}, r"min_exit_layer \(0\)"),
        ],
    )
    def test_rejects_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ExitPolicyConfig(**kwargs)

    def test_is_frozen(self):
        cfg = ExitPolicyConfig()
        with pytest.raises(Exception):
            cfg.patience = 3  # type: ignore[misc]

    @pytest.mark.parametrize("kind, entropy, patience", [("entropy", True, False), ("patience", False, True), ("none", False, False)])
    def test_kind_flags(self, kind, entropy, patience):
        cfg = ExitPolicyConfig(kind=kind)
        assert (cfg.uses_entropy, cfg.uses_patience) == (entropy, patience)


class TestEarlyExitConfig:
    def test_round_trip(self):
        cfg = EarlyExitConfig(task="relation", label_names=("none", "effect"), policy=ExitPolicyConfig(patience=4))
        again = EarlyExitConfig.from_dict(cfg.to_dict())
        assert again == cfg and again.num_labels == 2

    @pytest.mark.parametrize(
        "kwargs, match",
        [
            ({"task": "summarise", "label_names": ("a", "b")}, r"task \('summarise'\)"),
            ({"task": "sequence", "label_names": ("a",)}, r"at least 2 labels"),
            ({"task": "sequence", "label_names": ("a", "a")}, r"unique"),
            ({"task": "sequence", "label_names": ("a", "b"), "head_dropout": 1.0}, r"head_dropout"),
        ],
    )
    def test_rejects_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            EarlyExitConfig(**kwargs)

    def test_unknown_keys_rejected(self):
        with pytest.raises(ValueError, match="unknown early-exit config keys"):
            EarlyExitConfig.from_dict({"task": "sequence", "label_names": ["a", "b"], "tau": 0.1})


class TestEngineConfig:
    @pytest.mark.parametrize(
        "kwargs, match",
        [({"batch_size": 0}, r"batch_size \(0\)"), ({"batch_size": 8, "window_size": 4}, r"window_size \(4\)"),
         ({"precision": "int8", "device": "cuda"}, r"'int8' runs on the CPU only"),
         ({"precision": "float16"}, r"precision \('float16'\) must be one of float32, bfloat16, int8")],
    )
    def test_rejects_bad_values(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**kwargs)

    def test_default_window(self):
        assert EngineConfig(batch_size=8).effective_window == 128
