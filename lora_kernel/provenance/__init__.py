"""Read-only evidence: the manifest format and every verifier (records, ledger chain,
checkpoints, signed head, publications, dataset and model inputs) and the auditor's queries.

Imports only :mod:`lora_kernel.common`; never holds or loads a private key, never imports torch.
Verifiers take their trust root (the pinned public key) as an argument, like sigstore's.

Runs as: whoever verifies (an auditor, a reviewer, the service account); it only reads.
"""
