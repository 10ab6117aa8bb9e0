"""The model: vision towers, projectors, the composite LLaVA model and offline tiny builders."""
