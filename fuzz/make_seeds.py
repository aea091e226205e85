"""Regenerate the fuzz seeds: `cd fuzz && python3 make_seeds.py` (needs tiktoken, and `nc-data synth --out
/tmp/synthdata` run first for the tokenizer_files seed)."""
import pickle
import shutil
import struct

import tiktoken


def shard(tokens, magic, ver, fmt):
    h = [0] * 256
    h[0], h[1], h[2] = magic, ver, len(tokens)
    return struct.pack('<256i', *h) + b''.join(struct.pack(fmt, t) for t in tokens)


open('seeds/shard_header/u16', 'wb').write(shard([1, 2, 3, 65535], 20240520, 1, '<H'))
open('seeds/shard_header/u32', 'wb').write(shard([70000, 5], 20240801, 7, '<I'))
shutil.copy('../core/tests/fixtures/tokenizer/rustbpe_ranks.tiktoken', 'seeds/tiktoken_ranks/rustbpe')
d = '/tmp/synthdata/tokenizer/'
parts = [open(d + n, 'rb').read() for n in ('tokenizer.json', 'tokenizer.tiktoken', 'token_bytes.json')]
open('seeds/tokenizer_files/synth', 'wb').write(b'\xff'.join(parts))
ranks = {bytes([i]): i for i in range(256)}
ranks[b'ab'] = 256
ranks[b'abc'] = 257
pat = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"
enc = tiktoken.Encoding(name='tiny', pat_str=pat, mergeable_ranks=ranks, special_tokens={'<|bos|>': 258})
for proto, name in ((4, 'tiny_p4'), (2, 'tiny_p2'), (5, 'tiny_p5')):
    open('seeds/pickle/' + name, 'wb').write(pickle.dumps(enc, protocol=proto))
open('seeds/decode/ids', 'wb').write(bytes(range(0, 200)))
open('seeds/encode/text', 'wb').write("Hello  world!! I'm 12345 日本語 🙂\r\n\n  <|bos|>x\u00a0y".encode())
