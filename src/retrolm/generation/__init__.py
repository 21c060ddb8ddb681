"""Generation internals: next-token choice, online retrieval, speculative drafting.

The public entry point is `retrolm.generate.generate`; these modules are its parts.
"""
