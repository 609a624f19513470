"""Metadata keys on graph nodes: the ones slimgraph's passes write for later passes, heal and the
backends to read, and the exporter's it reads. One place, so the writer and the readers agree."""

# The last Mul of a binary-weight decode (quantize:binary); value "axis=A", A the output channels'.
BINARY_WEIGHT_TAG = "slimgraph.binary_weight"
# A share-weights Gather whose codebook entry 0 is a sparse weight's fixed zero; value "1".
CODEBOOK_ZERO_TAG = "slimgraph.codebook_zero"
# torch.onnx (dynamo): the module path a node came from, which prune-layers reads to find blocks.
TORCH_NAME_SCOPES = "pkg.torch.onnx.name_scopes"
