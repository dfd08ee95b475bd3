"""Runs kernel_driver's bare build (a static x86-64 ELF, no OS) on bochscpu,
Bochs's x86 CPU emulator, whose CPU has AVX-512 (F, CD, DQ, BW, VL): how the
AVX-512 kernels run on a machine without AVX-512. One CPU, ring 0, long
mode, the first GiB identity-mapped (2 MiB pages), memory allocated on
first touch.

    python bare_x86.py ELF DIR

needs isoc23_shim.c built as libisoc23.so beside ELF (see import_bochscpu).
The files in DIR are packed as kernel_driver.cpp's records; the outputs
come back as files in DIR. Exits 1 with the driver's message, or the
exception and where it was raised, if the run fails.
"""
import ctypes
import struct
import sys
from pathlib import Path

PAGE = 4096
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000  # page tables
STACK_TOP = 0x0FFF_F000
IO, IO_SIZE = 0x1000_0000, 0x1000_0000
HEAP, HEAP_SIZE = 0x2000_0000, 0x2000_0000
RECORD = 64  # name[16], size, padding; data padded to 64 bytes


def import_bochscpu(shim):
    """The PyPI wheel was linked against glibc 2.38 and calls its C23
    strtoull and sscanf; Debian 12's glibc (2.36) has them under their
    older names: `shim` (isoc23_shim.c built), loaded globally first,
    supplies them."""
    ctypes.CDLL(str(shim), mode=ctypes.RTLD_GLOBAL)
    import bochscpu
    import bochscpu.cpu
    import bochscpu.memory
    return bochscpu


bochs = None  # the module, once imported
pages = {}


def page(gpa):
    gpa &= ~(PAGE - 1)
    if gpa not in pages:
        hva = bochs.memory.allocate_host_page()
        bochs.memory.page_insert(gpa, hva)
        pages[gpa] = hva


def write(addr, data):
    off = 0
    while off < len(data):
        a = addr + off
        page(a)
        n = min(len(data) - off, PAGE - a % PAGE)
        bochs.memory.phy_write(a, list(data[off:off + n]))
        off += n


def read(addr, n):
    out = bytearray()
    while len(out) < n:
        a = addr + len(out)
        page(a)
        out += bytes(bochs.memory.phy_read(a, min(n - len(out), PAGE - a % PAGE)))
    return bytes(out)


def load_elf(path):
    data = Path(path).read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2, "not a 64-bit ELF"
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        kind, _, off, vaddr, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data,
                                                                  phoff + i * phentsize)
        if kind == 1:  # PT_LOAD; the rest of memsz is zero, as untouched pages are
            write(vaddr, data[off:off + filesz])
    return entry


def segment(selector, attr):
    s = bochs.Segment()
    s.present, s.selector, s.base, s.limit, s.attr = True, selector, 0, 0xFFFF_FFFF, attr
    return s


def pack(folder):
    blob = bytearray(RECORD)  # header: status, message
    for f in sorted(Path(folder).iterdir()):
        data = f.read_bytes()
        blob += f.name.encode().ljust(16, b"\0")[:16] + struct.pack("<Q", len(data))
        blob += bytes(RECORD - 24) + data + bytes(-len(data) % RECORD)
    return blob + bytes(RECORD)


def unpack(folder, base):
    off = RECORD
    while True:
        head = read(base + off, 24)
        name, size = head[:16].rstrip(b"\0").decode(), struct.unpack_from("<Q", head, 16)[0]
        if not name:
            return
        if not (Path(folder) / name).exists():
            (Path(folder) / name).write_bytes(read(base + off + RECORD, size))
        off += RECORD + (size + RECORD - 1) // RECORD * RECORD


def run(elf, folder):
    sess = bochs.Session()
    sess.missing_page_handler = page
    write(PML4, struct.pack("<Q", PDPT | 3))
    write(PDPT, struct.pack("<Q", PD | 3))
    write(PD, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))
    blob = pack(folder)
    assert len(blob) < IO_SIZE // 2, "inputs too large"
    write(IO, blob)

    state = bochs.State()
    bochs.cpu.set_long_mode(state)
    state.cr3 = PML4
    state.cr4 |= 1 << 9 | 1 << 10 | 1 << 18  # OSFXSR, OSXMMEXCPT, OSXSAVE
    state.xcr0 = 0xE7  # x87, SSE, AVX, AVX-512 opmask and ZMM state
    # As at a process's start: x87 and SSE exceptions masked, x87 registers empty.
    state.fpcw, state.fptw, state.mxcsr = 0x37F, 0xFFFF, 0x1F80
    state.rip = load_elf(elf)
    state.rsp = STACK_TOP - 8  # as after a call
    state.rdi, state.rsi, state.rdx, state.rcx = IO, IO_SIZE, HEAP, HEAP_SIZE
    state.cs = segment(0x10, 0x229B)  # 64-bit code, ring 0
    for reg in ("ds", "ss", "es", "fs", "gs"):
        setattr(state, reg, segment(0x18, 0xC93))
    sess.cpu.state = state

    stop = {}

    def on_exception(s, cpu, vector, code):
        stop.update(exception=f"exception {vector} (error code {code}) at {s.cpu.state.rip:#x}")
        s.stop()

    def on_hlt(s, cpu):
        s.stop()

    hook = bochs.Hook()
    hook.exception, hook.hlt = on_exception, on_hlt
    sess.run([hook])
    if stop:
        sys.exit(f"bare_x86: {stop['exception']}")
    status = struct.unpack("<Q", read(IO, 8))[0]
    if status != 1:
        message = read(IO + 8, 56).split(b"\0")[0].decode()
        sys.exit(f"bare_x86: kernel_driver: {message}")
    unpack(folder, IO)


if __name__ == "__main__":
    bochs = import_bochscpu(Path(sys.argv[1]).with_name("libisoc23.so"))
    run(sys.argv[1], sys.argv[2])
