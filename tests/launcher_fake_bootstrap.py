"""A stand-in for `python -m bootstrap` in the models screen tests: prints progress like a download."""

import sys
import time

if __name__ == "__main__":
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "download":
        for percent in (0, 25, 50, 75, 100):
            sys.stdout.write(f"\rclip_l.safetensors {percent:3d}% {percent * 2} MB / 200 MB")
            sys.stdout.flush()
            time.sleep(0.02)
        print("\nclip_l.safetensors: verified sha256")
        sys.exit(0)
    if command == "fit":  # two presets' verdicts, as `bootstrap fit --json` prints them
        print(
            '{"preset": "schnell-fp8", "title": "t", "disk_gb": 17.3, "fits": true, "recommended": true, '
            '"verdict": "runs on the CPU in 14.6 GB RAM; about 3 min per step", "image_seconds": 800}'
        )
        print(
            '{"preset": "dev-full", "title": "t", "disk_gb": 34.2, "fits": false, "recommended": false, '
            '"verdict": "on the CPU it needs 27.6 GB RAM", "image_seconds": 5000}'
        )
        sys.exit(0)
    if command == "verify":
        print("ae.safetensors: MISMATCH sha256")
        sys.exit(3)
    print(f"unknown command {command}", file=sys.stderr)
    sys.exit(2)
