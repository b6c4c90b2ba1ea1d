"""Environments with verifiable rewards for RL and evaluation, the agent loop, and the sandbox."""
