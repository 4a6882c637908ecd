"""Integrations of the MoE layer with other libraries; each submodule imports its library lazily, on use."""
