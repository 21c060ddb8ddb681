"""Generation internals: next-token choice, online retrieval, speculative drafting.

The public entry point is `retrolm.generation.decode.generate`; these modules are its parts.
"""
