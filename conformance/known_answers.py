"""FLORA-RNG v1 known answers (docs/spec.md §2): the one copy every RNG test imports."""

# Random123 kat_vectors for philox4x32_10: counter, key -> words.
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF,) * 4,
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
# Rows 0 and 1, columns 0-7, of seed = step = stream = 0.
GOLDEN_ROWS = [
    "6627e8d5 e169c58d bc57ac4c 9b00dbd8 f8e4cca4 5cb200db b1a574eb 097eff67",
    "6ad0c5ec ea236249 73a459f5 074944b3 6da11836 e4c29d23 fc0d53ee 645d5243",
]
