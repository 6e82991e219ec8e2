"""What every layer uses: atomic files and checksums, fault points, heap release, solves."""
