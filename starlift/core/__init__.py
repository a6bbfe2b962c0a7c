"""The base layer every stage imports: typed errors, file helpers, the artifact contract.

It imports nothing else of starlift's and no heavy library, so a runtime-only install can use it.
"""
