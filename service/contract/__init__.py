"""The torch-free contract shared by the trainer and the service.

Everything here imports without torch, so the API image stays slim and the worker and the
server agree on one definition of the job schema, image decoding and the model registry.
"""
