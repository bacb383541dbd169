"""Neutral code every zone may use: digests, time, paths, policy loading, errors, version.

Standard library, PyYAML and cryptography only; nothing here holds a key or imports torch.

Runs as: whichever account imports it (neutral code: the user's side and the trusted side
alike).
"""
