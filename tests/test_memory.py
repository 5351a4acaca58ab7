"""malloc_trim after start-up: freed heap inside glibc's heap really goes back."""

from twisted.trial import unittest


class ReleaseFreeHeapTests(unittest.TestCase):
    @staticmethod
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    def test_freed_heap_inside_the_heap_goes_back(self):
        from vdsm_twisted.common.memory import release_free_heap

        garbage = [bytearray(4000) for _ in range(20000)]  # ~80 MiB on the malloc heap
        pin = bytearray(4000)  # above it: the heap cannot simply shrink from the top
        before = self.rss_kib()
        del garbage
        freed = self.rss_kib()
        self.assertTrue(release_free_heap())
        after = self.rss_kib()
        self.assertGreater(before - after, 40 * 1024, (before, freed, after))
        del pin
