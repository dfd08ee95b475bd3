"""The project's main job: see mlx_flash_attn/bench.py (also `python -m mlx_flash_attn.bench`)."""

from mlx_flash_attn.bench import main

if __name__ == "__main__":
    main()
