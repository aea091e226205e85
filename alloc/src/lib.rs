//! nc-alloc: A caching allocator for GPU memory, generic over a raw memory source.
