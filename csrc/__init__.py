"""C++/CUDA sources of semask_fast (installed as data; compiled just in time)."""
