#!/usr/bin/env python
"""Write synthetic captioned clips (moving shapes; varied sizes, fps, lengths) + manifest.jsonl.

  python tools/make_demo_clips.py /tmp/demo/clips --n 24 --images 2
"""
import argparse

from sora_dist.data.demo_clips import make_demo_clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=12, help="number of mp4 clips")
    ap.add_argument("--images", type=int, default=2, help="number of png stills (1-frame samples)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(make_demo_clips(args.out_dir, n=args.n, seed=args.seed, images=args.images))


if __name__ == "__main__":
    main()
