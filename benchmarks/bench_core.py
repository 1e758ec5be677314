"""The core benchmark (see ldbfx/bench.py for what it measures and the targets it checks).

    python benchmarks/bench_core.py --models resnet50 vit_b_16 --resolution 128 --batch 8 \
        --steps 5 --rounds 4 --out cpu.json
"""

from ldbfx.app.bench import main

if __name__ == "__main__":
    main()
