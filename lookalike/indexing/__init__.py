"""The index lifecycle, run by the operator (`lookalike index`) against running servers: reading a
catalog, embedding it through the server, choosing and building the index, publishing it as a new
version of the model repository (or a Milvus generation), rollback, and the model configs it writes."""
