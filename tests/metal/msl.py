"""Metal-on-CPU emulator: compile .metal kernels as strict C++ with clang-19
and run them thread by thread on the CPU (see README.md in this folder).

    kern = msl.compile("kernels/foo.metal", name="foo_float_64", constants={0: True})
    res = kern.launch(grid=(gx, gy, gz), threadgroup=(tx, ty, tz), buffers=[a, b, params])
    res.counters[0].read   # bytes the kernel read from buffer 0

Pipeline: clang -E (shim headers only) -> source rewriter (MSL attributes,
function constants, threadgroup declarations, vector constructors, float
literals) -> clang -emit-llvm -> IR instrumenter (a checked, counted call
before every device/constant/threadgroup access) -> shared library linked with
runtime/msl_runtime.cpp, driven through ctypes.
"""
from __future__ import annotations

import bisect
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHIM = HERE / "shim"
RUNTIME = HERE / "runtime" / "msl_runtime.cpp"

TG_LIMIT = 32768  # bytes of threadgroup memory per threadgroup (Apple GPUs)
MAX_THREADS = 1024

# The flags every kernel is compiled with. The excess-precision flags make each
# half/bfloat operation round like the GPU; lax vector conversions off rejects
# the implicit vector conversions MSL rejects.
CXXFLAGS = [
    "-std=c++17", "-fPIC", "-fno-exceptions", "-fno-rtti", "-fno-threadsafe-statics", "-fstack-clash-protection",
    "-Xclang", "-ffloat16-excess-precision=none", "-Xclang", "-fbfloat16-excess-precision=none",
    "-fno-strict-aliasing", "-flax-vector-conversions=none", "-ffp-contract=off",
    "-Wall", "-Wno-unused", "-Wno-unused-variable", "-Wno-unused-function", "-Wno-unknown-pragmas",
    "-Wno-uninitialized", "-Wno-sometimes-uninitialized", "-Wno-unused-but-set-variable",
    "-Werror=double-promotion", "-Werror=unknown-attributes", "-Werror=vla", "-Werror=vla-extension",
    "-Werror=return-type", "-Werror=infinite-recursion", "-Werror=ignored-attributes",
]
PREPROCESS_DEFINES = ["-D__METAL_VERSION__=310", "-D__METAL_MACOS__=1", "-D__HAVE_BFLOAT__=1"]


class CompileError(Exception):
    """The kernel source is outside the supported MSL subset or does not compile."""


class KernelFault(Exception):
    """A launch hit a fault: out-of-bounds access, race, deadlock, divergence..."""


class LaunchError(ValueError):
    """The launch arguments do not match the kernel."""


def clang() -> str | None:
    """Path of clang++-19 (MSL_CLANG overrides), or None when not installed."""
    env = os.environ.get("MSL_CLANG")
    return shutil.which(env) if env else shutil.which("clang++-19")


def cache_dir() -> Path:
    d = Path(os.environ.get("MSL_EMU_CACHE") or Path.home() / ".cache" / "mlx_flash_attn_msl")
    d.mkdir(parents=True, exist_ok=True)
    return d


def _run(cmd, what):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise CompileError(f"{what} failed:\n{p.stderr.strip() or p.stdout.strip()}")
    return p


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()[:24]


def _atomic_write(path: Path, data: str):
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------
# Source rewriter
# --------------------------------------------------------------------------

VEC_TYPE = r"(?:bool|char|uchar|short|ushort|int|uint|long|ulong|half|float|bfloat)[234]"
BUILTINS = {
    "thread_position_in_grid": "TPIG",
    "thread_position_in_threadgroup": "TPTG",
    "threadgroup_position_in_grid": "TGPIG",
    "threads_per_threadgroup": "TPTG_SIZE",
    "dispatch_threads_per_threadgroup": "TPTG_SIZE",
    "threadgroups_per_grid": "TGPG",
    "threads_per_grid": "TPG",
    "grid_size": "TPG",
    "thread_index_in_threadgroup": "TIITG",
    "thread_index_in_simdgroup": "TIISG",
    "simdgroup_index_in_threadgroup": "SGIITG",
    "simdgroups_per_threadgroup": "SGPTG",
    "threads_per_simdgroup": "SIMD_WIDTH",
    "thread_execution_width": "SIMD_WIDTH",
}
MSL_DECL_ATTRS = {"kernel", "host_name", "function_constant", "max_total_threads_per_threadgroup",
                  "buffer", "threadgroup"}
STD_ATTRS = {"maybe_unused", "likely", "unlikely", "fallthrough", "nodiscard", "deprecated", "noreturn"}
UNSUPPORTED_ATTRS = {"texture", "sampler", "stage_in", "vertex_id", "instance_id", "position", "user",
                     "color", "raster_order_group", "vertex", "fragment", "visible", "stitchable",
                     "object", "mesh", "payload", "imageblock_data", "thread_index_in_quadgroup",
                     "quadgroup_index_in_threadgroup", "quadgroups_per_threadgroup", "sample_id",
                     "point_coord", "front_facing", "render_target_array_index", "amplification_id"}
FC_TYPES = {"bool": "c_bool", "char": "c_int8", "uchar": "c_uint8", "short": "c_int16", "ushort": "c_uint16",
            "int": "c_int32", "uint": "c_uint32", "long": "c_int64", "ulong": "c_uint64", "float": "c_float",
            "half": "half"}


def _mask(text: str) -> str:
    """Same-length copy with string/char literal bodies and directive lines
    blanked, so regexes only see code."""
    out = list(text)
    i, n = 0, len(text)
    at_line_start = True
    while i < n:
        c = text[i]
        if at_line_start and c == "#":
            j = text.find("\n", i)
            j = n if j < 0 else j
            for k in range(i, j):
                out[k] = " "
            i = j
            continue
        if c == "\n":
            at_line_start = True
            i += 1
            continue
        if not c.isspace():
            at_line_start = False
        if c == '"' or (c == "'" and not (i and (text[i - 1].isalnum() or text[i - 1] == "_"))):
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            for k in range(i + 1, min(j, n)):
                if out[k] != "\n":
                    out[k] = " "
            i = j + 1
            continue
        i += 1
    return "".join(out)


def _template_args(code, text, k):
    """Explicit template arguments "<...>" starting at k, if any, and the index after them."""
    if code[k] != "<":
        return "", k
    end = _close(code, k)
    return text[k:end + 1], end + 1


def _close(code: str, i: int) -> int:
    """Index of the bracket closing code[i] (one of ([{<), balancing all kinds."""
    pairs = {"(": ")", "[": "]", "{": "}", "<": ">"}
    stack = [pairs[code[i]]]
    j = i + 1
    while j < len(code):
        c = code[j]
        if c in "([{" or (c == "<" and stack[-1] == ">"):
            stack.append(pairs[c])
        elif c in ")]}>":
            if c == ">" and stack[-1] != ">":
                j += 1
                continue
            if c != stack[-1]:
                if stack[-1] == ">":  # a comparison inside <...>: give up on the angle
                    stack.pop()
                    continue
                raise CompileError(f"unbalanced '{code[i]}'")
            stack.pop()
            if not stack:
                return j
        j += 1
    raise CompileError(f"unbalanced '{code[i]}'")


def _split_top(s: str, sep=","):
    """Split on sep outside (), [], {}, <>."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(s):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == sep and depth == 0:
            parts.append((start, i))
            start = i + 1
    parts.append((start, len(s)))
    return parts


def _blank(s: str) -> str:
    return re.sub(r"[^\n]", " ", s)


def _apply(text: str, edits) -> str:
    """Apply (start, end, replacement) edits; an edit inside an earlier, wider
    one is dropped (the outer edit already rewrote that text)."""
    out, pos = [], 0
    for s, e, r in sorted(edits, key=lambda x: (x[0], -x[1])):
        if s < pos:
            continue
        out.append(text[pos:s])
        out.append(r)
        pos = e
    out.append(text[pos:])
    return "".join(out)


def _pad_lines(orig: str, repl: str) -> str:
    """Keep line numbering: a multi-line span rewritten to one line gets its newlines back."""
    return repl + "\n" * orig.count("\n")


@dataclass
class KernelInfo:
    host_name: str
    function: str
    fnexpr: str
    entry: str
    params: list
    max_threads: int | None = None


class Rewriter:
    """Turns preprocessed MSL into C++ the shim can compile."""

    def __init__(self, text: str):
        self.text = text
        self.kernels: list[KernelInfo] = []
        self.defs: dict[str, dict] = {}
        self.fcs: list[dict] = []
        self.derived: list[tuple[str, str]] = []
        self.tg_id = 0
        self._index_lines(text)

    # ---- locations from linemarkers, for messages
    def _index_lines(self, text):
        self.line_starts = [0]
        for m in re.finditer(r"\n", text):
            self.line_starts.append(m.end())
        self.line_loc = []
        cur_file, cur_line = "<input>", 1
        for i, st in enumerate(self.line_starts):
            end = self.line_starts[i + 1] if i + 1 < len(self.line_starts) else len(text)
            line = text[st:end]
            m = re.match(r'#\s*(?:line\s+)?(\d+)\s+"([^"]*)"', line)
            if m:
                self.line_loc.append((cur_file, cur_line))
                cur_file, cur_line = m.group(2), int(m.group(1))
            else:
                self.line_loc.append((cur_file, cur_line))
                cur_line += 1

    def where(self, pos: int) -> str:
        i = bisect.bisect_right(self.line_starts, pos) - 1
        f, ln = self.line_loc[i]
        return f"{f}:{ln}"

    def error(self, pos, msg):
        raise CompileError(f"{self.where(pos)}: error: {msg}")

    # ---- main
    def run(self) -> str:
        text = self.text
        code = _mask(text)
        self._checks(code)
        text = _apply(text, self._phase_attributes(text, code))
        code = _mask(text)
        text = _apply(text, self._phase_declarations(text, code))
        code = _mask(text)
        text = _apply(text, self._phase_expressions(text, code))
        return self._prelude() + text + self._generated()

    def _checks(self, code):
        for pat, msg in [
            (r"\bdouble\b", "'double' is not supported in Metal (use float)"),
            (r"\bvirtual\b", "virtual functions are not supported in Metal"),
            (r"\bnew\b", "'new' is not supported in Metal"),
            (r"\b(?:throw|try|catch)\b", "exceptions are not supported in Metal"),
            (r"\b(?:typeid|dynamic_cast)\b", "RTTI is not supported in Metal"),
            (r"(?<![\w.])(?:\d+\.\d*|\.\d+)(?:[eE][+-]?\d+)?[lL](?![\w.])", "long double literals are not supported in Metal"),
        ]:
            m = re.search(pat, code)
            if m:
                self.error(m.start(), msg)

    # ---- attributes, kernels, function constants
    def _attrs(self, code):
        """All [[...]] in the code: (start, end, [(name, args)])."""
        out = []
        for m in re.finditer(r"\[\[", code):
            s = m.start()
            e = code.find("]]", s)
            if e < 0:
                self.error(s, "unterminated attribute")
            body = code[s + 2:e]
            items = []
            for a, b in _split_top(body):
                it = body[a:b].strip()
                if not it:
                    continue
                mm = re.match(r"([\w:]+)\s*(?:\((.*)\))?\s*$", it, re.S)
                if not mm:
                    self.error(s, f"cannot parse attribute [[{it}]]")
                items.append((mm.group(1), (mm.group(2) or "").strip()))
            out.append((s, e + 2, items))
        return out

    def _phase_attributes(self, text, code):
        edits = []
        attrs = self._attrs(code)
        by_start = {a[0]: a for a in attrs}
        for s, e, items in attrs:
            for name, args in items:
                base = name.split("::")[-1]
                if name in STD_ATTRS or name.startswith(("clang::", "gnu::")):
                    continue
                if base in UNSUPPORTED_ATTRS:
                    self.error(s, f"attribute [[{name}]] is outside the emulator's MSL subset (compute kernels only)")
                if name not in MSL_DECL_ATTRS and name not in BUILTINS:
                    self.error(s, f"unknown attribute [[{name}]]: MSL would reject it")
        kernel_marks = [(s, e) for s, e, items in attrs if any(n == "kernel" for n, _ in items)]
        kernel_marks += [(m.start(), m.end()) for m in re.finditer(r"\bkernel\b(?=\s*(?:\[\[|void\b))", code)]
        for s, e in sorted(kernel_marks):
            edits += self._kernel(text, code, s, e, by_start)
        for s, e, items in attrs:
            names = [n for n, _ in items]
            if "function_constant" in names:
                edits += self._function_constant(text, code, s, e, items)
        fc_names = {f["name"] for f in self.fcs}
        if fc_names:
            edits += self._derived_constants(text, code, fc_names)
        # Strip every remaining MSL attribute (standard ones stay for clang).
        for s, e, items in attrs:
            if all(n in STD_ATTRS or n.startswith(("clang::", "gnu::")) for n, _ in items):
                continue
            edits.append((s, e, _blank(text[s:e])))
        return edits

    def _skip_ws_attrs(self, code, i, by_start):
        while True:
            while i < len(code) and code[i].isspace():
                i += 1
            if code.startswith("[[", i) and i in by_start:
                i = by_start[i][1]
                continue
            return i

    def _kernel(self, text, code, s, e, by_start):
        edits = [(s, e, " " * (e - s))]
        # Look back for `template` (instantiation) or `>` (template definition)
        j = s - 1
        while True:
            while j >= 0 and code[j].isspace():
                j -= 1
            if j >= 1 and code[j - 1:j + 1] == "]]":
                k = code.rfind("[[", 0, j)
                j = k - 1
                continue
            break
        stmt_start = j + 1
        is_inst = False
        is_template_def = False
        if j >= 7 and code[j - 7:j + 1] == "template" and not re.match(r"[\w]", code[j - 8] if j >= 8 else " "):
            is_inst = True
            stmt_start = j - 7
        elif j >= 0 and code[j] == ">":
            is_template_def = True
        # host_name in the attributes around the marker
        host = None
        max_threads = None
        for a in by_start.values():
            if stmt_start <= a[0] < e + 200 and a[0] < code.find("(", e):
                for n, args in a[2]:
                    if n == "host_name":
                        host = text[a[0]:a[1]]
                        # adjacent literals ("a_" "float") concatenate, as in C++
                        host = "".join(re.findall(r'"((?:[^"\\]|\\.)*)"', host)) or None
                    if n == "max_total_threads_per_threadgroup":
                        try:
                            max_threads = int(args, 0)
                        except ValueError:
                            max_threads = None
        i = self._skip_ws_attrs(code, e, by_start)
        if code.startswith("decltype", i):
            p = code.find("(", i)
            q = _close(code, p)
            m = re.compile(r"\s*([\w:]+)\s*").match(code, q + 1)
            fname = m.group(1)
            targs, k = _template_args(code, text, m.end())
            semi = code.find(";", k)
            if not is_inst:
                self.error(s, "decltype kernel declaration must be an explicit instantiation")
            self._add_kernel(s, host or fname, fname, fname + targs, max_threads)
            edits.append((stmt_start, semi + 1, _blank(text[stmt_start:semi + 1])))
            return edits
        m = re.compile(r"void\s+([\w]+)\s*").match(code, i)
        if not m:
            self.error(s, "a kernel must return void")
        fname = m.group(1)
        targs, k = _template_args(code, text, m.end())
        if targs:
            while code[k].isspace():
                k += 1
        if code[k] != "(":
            self.error(s, f"cannot parse kernel '{fname}'")
        pe = _close(code, k)
        after = self._skip_ws_attrs(code, pe + 1, by_start)
        if is_inst:
            semi = code.find(";", pe)
            self._add_kernel(s, host or fname, fname, fname + targs, max_threads)
            edits.append((stmt_start, semi + 1, _blank(text[stmt_start:semi + 1])))
            return edits
        params = self._params(text, code, k, pe, by_start)
        if code[after] == "{":
            if fname in self.defs:
                self.error(s, f"kernel '{fname}' defined twice (overloaded kernels are not supported)")
            self.defs[fname] = {"params": params, "max_threads": max_threads}
            if not is_template_def:
                self._add_kernel(s, host or fname, fname, fname, max_threads)
        return edits

    def _params(self, text, code, p0, p1, by_start):
        params = []
        inner = code[p0 + 1:p1]
        for a, b in _split_top(inner):
            ptext, pcode = text[p0 + 1 + a:p0 + 1 + b], inner[a:b]
            if not pcode.strip() or pcode.strip() == "void":
                continue
            attrs = [(n, args) for st, en, items in by_start.values()
                     if p0 + 1 + a <= st < p0 + 1 + b for n, args in items]
            decl = re.sub(r"\[\[.*?\]\]", "", pcode).strip()
            mm = re.search(r"(\w+)\s*$", decl)
            pname = mm.group(1) if mm else "?"
            kind, index = None, 0
            for n, args in attrs:
                if n == "buffer":
                    kind, index = "buffer", int(args, 0)
                elif n == "threadgroup":
                    kind, index = "threadgroup", int(args, 0)
                elif n in BUILTINS:
                    kind = n
            if kind is None:
                self.error(p0 + 1 + a, f"kernel parameter '{pname}' has no [[buffer(n)]] or builtin attribute")
            space = next((w for w in ("device", "constant", "threadgroup") if re.search(rf"\b{w}\b", decl)), None)
            params.append({
                "name": pname, "kind": kind, "index": index, "decl": " ".join(decl.split()),
                "space": space, "const": bool(re.search(r"\bconst\b", decl)),
                "reference": "&" in decl, "pointer": "*" in decl,
            })
        return params

    def _add_kernel(self, pos, host, fname, fnexpr, max_threads):
        if any(k.host_name == host for k in self.kernels):
            self.error(pos, f"two kernels named '{host}'")
        self.kernels.append(KernelInfo(host, fname, fnexpr, f"__msl_entry_{len(self.kernels)}", [], max_threads))

    def _stmt_bounds(self, code, s):
        a = max(code.rfind(";", 0, s), code.rfind("{", 0, s), code.rfind("}", 0, s)) + 1
        b = code.find(";", s)
        return a, b

    def _function_constant(self, text, code, s, e, items):
        idx = next(args for n, args in items if n == "function_constant")
        a, b = self._stmt_bounds(code, s)
        decl = code[a:s]
        m = re.match(r"\s*(?:static\s+)?constant\s+(?:const\s+)?(\w+)\s+(\w+)\s*$", decl)
        if not m:
            self.error(s, "function constants must be declared as `constant T name [[function_constant(i)]];`")
        ty, name = m.group(1), m.group(2)
        if ty not in FC_TYPES:
            self.error(s, f"function constant type '{ty}' is not supported")
        self.fcs.append({"name": name, "index": int(idx, 0), "type": ty})
        repl = f"static {ty} {name} = ({ty})0; static bool __msl_fcdef_{name} = false;"
        return [(a, b + 1, _pad_lines(text[a:b + 1], " " + repl))]

    def _derived_constants(self, text, code, fc_names):
        """Program-scope `constant T x = expr-of-function-constants;` must be
        evaluated after the constants are set: becomes a variable set at launch."""
        edits = []
        depth = 0
        depths = []
        for c in code:
            depths.append(depth)
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
        for m in re.finditer(r"(?:(?<=[;{}])|^)\s*(?:static\s+)?constant\s+([^;=\[]+?)\s+(\w+)\s*=([^;]*);", code, re.M):
            if depths[m.start(1)] != 0 or "constexpr" in m.group(0):
                continue
            if not any(re.search(rf"\b(?:__msl_fcdef_)?{re.escape(n)}\b", m.group(3)) for n in fc_names):
                continue
            ty, name = m.group(1).replace("const ", "").strip(), m.group(2)
            fc_names = fc_names | {name}  # constants derived from derived constants
            self.derived.append((name, text[m.start(3):m.end(3)].strip()))
            s0 = m.start() + len(m.group(0)) - len(m.group(0).lstrip())
            edits.append((s0, m.end(), _pad_lines(text[s0:m.end()], f"static {ty} {name};")))
        return edits

    # ---- threadgroup declarations, address-space method qualifiers
    def _phase_declarations(self, text, code):
        edits = []
        depth = 0
        depths = []
        for c in code:
            depths.append(depth)
            depth += c == "{"
            depth -= c == "}"
        for m in re.finditer(r"\bthreadgroup\b", code):
            s = m.start()
            j = s - 1
            while j >= 0 and code[j].isspace():
                j -= 1
            if depths[s] == 0 or (j >= 0 and code[j] not in ";{}"):
                continue
            semi = s
            pd = 0
            while semi < len(code) and not (code[semi] == ";" and pd == 0):
                pd += code[semi] in "([{"
                pd -= code[semi] in ")]}"
                semi += 1
            rest = code[m.end():semi].strip()
            dims = ""
            while rest.endswith("]"):
                depth_b = 0
                for o in range(len(rest) - 1, -1, -1):
                    depth_b += rest[o] == "]"
                    depth_b -= rest[o] == "["
                    if depth_b == 0:
                        break
                dims = rest[o:] + dims
                rest = rest[:o].rstrip()
            mm = re.match(r"(.*?)(\w+)$", rest, re.S)
            if not mm or "=" in rest or "(" in rest:
                continue
            ty = mm.group(1).strip()
            name = mm.group(2)
            if not ty or ty.endswith(("*", "&")) or ty in ("const",):
                continue
            if any(b > a for a, b in _split_top(ty)[1:]):
                self.error(s, "declare one threadgroup variable per statement")
            self.tg_id += 1
            dims_src = " ".join(dims.split())  # masked code equals the text here: no literals in a declarator
            if dims:
                repl = (f"threadgroup {ty} (&{name}){dims_src} = *(threadgroup {ty} (*){dims_src})"
                        f"__msl_rt_tg_alloc({self.tg_id}, sizeof({ty}{dims_src}), alignof({ty}))")
            else:
                repl = (f"threadgroup {ty} &{name} = *(threadgroup {ty} *)"
                        f"__msl_rt_tg_alloc({self.tg_id}, sizeof({ty}), alignof({ty}))")
            edits.append((s, semi, _pad_lines(text[s:semi], repl)))
        # Function-scope `constexpr constant int k = 3;`: automatic variables
        # cannot carry an address space in clang; the value is what matters.
        for m in re.finditer(r"(?:(?<=[;{}])|^)(\s*(?:(?:constexpr|const)\s+)*)(constant)\b", code, re.M):
            if depths[m.start(2)] > 0:
                edits.append((m.start(2), m.end(2), " " * 8))
        # `void f() const device {` -> address-space method qualifiers are not
        # C++; strip them (calling methods on non-thread objects is unsupported).
        for m in re.finditer(r"\)\s*(?:const\s+)?(device|threadgroup|constant|thread)\b(?=\s*(?:const\s*)?[{;])", code):
            edits.append((m.start(1), m.end(1), " " * (m.end(1) - m.start(1))))
        return edits

    # ---- vector constructors, casts and float literals
    def _phase_expressions(self, text, code):
        edits = []
        for m in re.finditer(rf"(?<![\w.])(?:::)?((?:metal::)?{VEC_TYPE})\s*\(", code):
            if re.search(r"operator\s*$", code[:m.start()][-20:]):
                continue
            edits.append((m.start(), m.end(), f"::metal::__vmake<{m.group(1)}>("))
        for m in re.finditer(r"(?<![\w.])(?:::)?((?:metal::)?vec)\s*<", code):
            lt = m.end() - 1
            gt = _close(code, lt)
            k = gt + 1
            while k < len(code) and code[k].isspace():
                k += 1
            if k < len(code) and code[k] == "(":
                edits.append((m.start(), k + 1, f"::metal::__vmake<{text[m.start(1):gt + 1]}>("))
        for m in re.finditer(rf"static_cast\s*<\s*((?:metal::)?{VEC_TYPE})\s*>\s*\(", code):
            edits.append((m.start(), m.end(), f"::metal::__vmake<{m.group(1)}>("))
        for m in re.finditer(rf"\(\s*((?:metal::)?{VEC_TYPE})\s*\)", code):
            j = m.start() - 1
            while j >= 0 and code[j].isspace():
                j -= 1
            if j >= 0 and (code[j].isalnum() or code[j] in "_)]>"):
                continue  # sizeof(float4), f(float4) ...
            end = self._operand_end(code, m.end())
            if end is None:
                self.error(m.start(), f"C-style cast to {m.group(1)}: write {m.group(1)}(x) instead "
                           "(clang would reinterpret the bits of a same-size vector)")
            edits.append((m.start(), end, f"::metal::__vmake<{m.group(1)}>({text[m.end():end]})"))
        for m in re.finditer(r"(?<![\w.])(\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+)([fFhH]?)(?![\w.])", code):
            suf = m.group(2)
            if suf in ("f", "F"):
                continue
            # MSL has no double: an unsuffixed literal is a float; 'h' is half.
            edits.append((m.start(), m.end(), m.group(1) + ("f16" if suf else "f")))
        return edits

    def _operand_end(self, code, i):
        n = len(code)
        while i < n and code[i].isspace():
            i += 1
        if i < n and code[i] == "(":
            return _close(code, i) + 1
        m = re.compile(r"[\w.]+(?:::\w+)*").match(code, i)
        if not m:
            return None
        k = m.end()
        while k < n:
            if code.startswith("->", k):
                mm = re.compile(r"->\s*\w+").match(code, k)
                k = mm.end()
            elif code[k] == ".":
                mm = re.compile(r"\.\s*\w+").match(code, k)
                k = mm.end()
            elif code[k] in "[(":
                k = _close(code, k) + 1
            else:
                break
        return k

    # ---- generated text
    def _prelude(self):
        return ("#define device __attribute__((address_space(1)))\n"
                "#define constant __attribute__((address_space(2)))\n"
                "#define threadgroup __attribute__((address_space(3)))\n"
                "#define thread\n"
                "#define kernel\n")

    def _generated(self):
        g = ['\n# 1 "<msl-emulator-generated>"']
        for k in self.kernels:
            d = self.defs.get(k.function)
            if d is None:
                raise CompileError(f"kernel '{k.host_name}': no [[kernel]] definition of '{k.function}' found")
            k.params = d["params"]
            if k.max_threads is None:
                k.max_threads = d["max_threads"]
            binds = ", ".join(["{-1, 0}"] + [
                "{metal::__bind::%s, %d}" % ("BUF" if p["kind"] == "buffer" else "TGBUF" if p["kind"] == "threadgroup"
                                              else BUILTINS[p["kind"]], p["index"]) for p in k.params])
            g.append(f"static const metal::__bind::binding {k.entry}_b[] = {{{binds}}};")
            g.append(f'extern "C" void {k.entry}(const __msl_ctx *c) {{ metal::__bind::launch(&{k.fnexpr}, {k.entry}_b + 1, c); }}')
            g.append(f'extern "C" void {k.entry}_sizes(ulong *o) {{ metal::__bind::sizes(&{k.fnexpr}, o); }}')
        addrs = ", ".join([f"(void *)&{f['name']}" for f in self.fcs] + ["nullptr"])
        defs = ", ".join([f"&__msl_fcdef_{f['name']}" for f in self.fcs] + ["nullptr"])
        g.append(f'extern "C" void *__msl_fc_addr[] = {{{addrs}}};')
        g.append(f'extern "C" bool *__msl_fc_def[] = {{{defs}}};')
        inits = " ".join(f"{n} = ({e});" for n, e in self.derived)
        g.append(f'extern "C" void __msl_fc_derive() {{ {inits} }}')
        return "\n".join(g) + "\n"


# --------------------------------------------------------------------------
# IR instrumentation
# --------------------------------------------------------------------------

def _ir_type(s: str) -> int:
    """Length of the LLVM type at the start of s."""
    if s.startswith("<{"):
        return _close(s, 1) + 2
    if s[0] in "<{[":
        return _close(s, 0) + 1
    m = re.match(r"ptr(?: addrspace\(\d+\))?|%[\w.\"$\-]+|[\w.]+", s)
    return m.end()


def _ir_operand(s: str) -> int:
    """Length of a value operand at the start of s (up to a top-level comma)."""
    depth = 0
    for i, c in enumerate(s):
        if c in "([{<":
            depth += 1
        elif c in ")]}>":
            depth -= 1
        elif c == "," and depth == 0:
            return i
    return len(s)


def _sizeof(ty: str) -> str:
    return f"ptrtoint (ptr getelementptr ({ty}, ptr null, i32 1) to i64)"


_PTR = re.compile(r"ptr addrspace\((\d+)\)(?: (?:align \d+|noundef|nonnull|readonly|writeonly))* ")


def _debug_locations(ll: str):
    """Map each !DILocation id to "file:line" (from -gline-tables-only)."""
    md = dict(re.findall(r"^!(\d+) = (?:distinct )?(.*)$", ll, re.M))
    files = {}

    def file_of(scope, depth=0):
        t = md.get(scope, "")
        m = re.search(r"\bfile: !(\d+)", t)
        if m:
            f = md.get(m.group(1), "")
            fm = re.search(r'filename: "([^"]*)"', f)
            return os.path.basename(fm.group(1)) if fm else "?"
        m = re.search(r"\bscope: !(\d+)", t)
        return file_of(m.group(1), depth + 1) if m and depth < 50 else "?"

    locs = {}
    for k, t in md.items():
        m = re.match(r"!DILocation\(line: (\d+)(?:, column: \d+)?, scope: !(\d+)", t)
        if m:
            sc = m.group(2)
            if sc not in files:
                files[sc] = file_of(sc)
            locs[k] = f"{files[sc]}:{m.group(1)}"
    return locs


def check_recursion(ll: str):
    """MSL forbids recursion: reject cycles in the call graph."""
    graph, cur = {}, None
    for line in ll.split("\n"):
        m = re.match(r'define .*?@("?[^"(\s]+"?)\(', line)
        if m:
            cur = m.group(1)
            graph[cur] = set()
        elif line.startswith("}"):
            cur = None
        elif cur and "call " in line:
            for c in re.findall(r"call [^@]*@(\"?[\w.$]+\"?)\(", line):
                graph[cur].add(c)
    state = {}

    def visit(f, path):
        state[f] = 1
        for g in graph.get(f, ()):
            if g not in graph:
                continue
            if state.get(g) == 1:
                cyc = path[path.index(g):] + [g] if g in path else [f, g]
                names = _demangle(cyc)
                raise CompileError("recursion is not supported in Metal: " + " -> ".join(names))
            if not state.get(g):
                visit(g, path + [g])
        state[f] = 2

    for f in graph:
        if not state.get(f):
            visit(f, [f])


def _demangle(names):
    tool = shutil.which("llvm-cxxfilt-19") or shutil.which("c++filt")
    if not tool:
        return names
    p = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    return p.stdout.split("\n")[:len(names)] if p.returncode == 0 else names


def instrument_ir(ll: str, spaces: set[int]):
    """Insert a checked, counted runtime call before every access to the given
    address spaces. Returns (new IR, location strings; index 0 = unknown)."""
    dbg = _debug_locations(ll)
    loc_ids = {}
    loc_list = [""]
    out = []
    for line in ll.split("\n"):
        if "addrspace(" in line and not line.startswith(("declare", "define", "@", "!", "attributes")):
            acc = _accesses(line, spaces)
            if acc:
                dm = re.search(r", !dbg (!\d+)", line)
                tail, loc = "", 0
                if dm:
                    tail = f", !dbg {dm.group(1)}"
                    where = dbg.get(dm.group(1)[1:])
                    if where:
                        if where not in loc_ids:
                            loc_ids[where] = len(loc_list)
                            loc_list.append(where)
                        loc = loc_ids[where]
                for sp, op, size, rw in acc:
                    out.append(f"  call void @__msl_rt_access{sp}(ptr addrspace({sp}) {op}, i64 {size}, "
                               f"i32 {rw}, i32 {loc}){tail}")
        out.append(line)
    for sp in sorted(spaces):
        out.append(f"declare void @__msl_rt_access{sp}(ptr addrspace({sp}), i64, i32, i32)")
    return "\n".join(out) + "\n", loc_list


def _accesses(line: str, spaces):
    s = line.strip()
    m = re.match(r"(?:%[\w.\-]+ = )?(load|store|atomicrmw|cmpxchg|call|tail call|musttail call|notail call)\b ?(.*)", s)
    if not m:
        return []
    kind, rest = m.group(1), m.group(2)
    res = []

    def ptr_at(r):
        pm = _PTR.match(r)
        if not pm:
            return None
        sp = int(pm.group(1))
        tail = r[pm.end():]
        om = re.match(r'%[\w.\-]+|%"[^"]*"', tail)  # named value; "atomic" stores put the ordering after it
        op = om.group(0) if om else tail[:_ir_operand(tail)].strip()
        return sp, op, tail

    atomic = 4 if rest.startswith("atomic ") else 0
    if kind == "load":
        rest = re.sub(r"^(atomic |volatile )+", "", rest)
        n = _ir_type(rest)
        ty = rest[:n]
        p = ptr_at(rest[n:].lstrip(", "))
        if p and p[0] in spaces:
            res.append((p[0], p[1], _sizeof(ty), 1 | atomic))
    elif kind == "store":
        rest = re.sub(r"^(atomic |volatile )+", "", rest)
        n = _ir_type(rest)
        ty = rest[:n]
        v = rest[n:].lstrip()
        vend = _ir_operand(v)
        p = ptr_at(v[vend:].lstrip(", "))
        if p and p[0] in spaces:
            res.append((p[0], p[1], _sizeof(ty), 2 | atomic))
    elif kind in ("atomicrmw", "cmpxchg"):
        rest = re.sub(r"^(weak |volatile |\w+ )*?(?=ptr )", "", rest)
        p = ptr_at(rest)
        if p and p[0] in spaces:
            after = p[2][_ir_operand(p[2]):].lstrip(", ")
            ty = after[:_ir_type(after)]
            res.append((p[0], p[1], _sizeof(ty), 7))
    else:
        cm = re.search(r"@llvm\.(memcpy|memmove|memset)(?:\.inline)?\.[\w.]+\((.*)\)", rest)
        if not cm:
            if "@llvm." in rest and any(f"addrspace({sp})" in rest for sp in spaces):
                if not re.search(r"@llvm\.(lifetime|dbg|assume|experimental\.noalias)", rest):
                    raise CompileError(f"emulator: cannot instrument intrinsic call: {s}")
            return []
        args = cm.group(2)
        parts = [args[a:b].strip() for a, b in _split_top(args)]
        size = parts[2].split()[-1]
        targets = [(parts[0], 2)] + ([(parts[1], 1)] if cm.group(1) != "memset" else [])
        for arg, rw in targets:
            p = ptr_at(arg + " ")
            if p and p[0] in spaces:
                res.append((p[0], arg.split()[-1], size, rw))
    return [r for r in res if r[1].startswith("%")]


# --------------------------------------------------------------------------
# Build and load
# --------------------------------------------------------------------------

_lock = threading.Lock()
_modules: dict[str, "Module"] = {}


def _tool_hash():
    parts = [Path(__file__).read_bytes(), RUNTIME.read_bytes()]
    for p in sorted(SHIM.iterdir()):
        parts.append(p.name)
        parts.append(p.read_bytes())
    return _sha(*parts, " ".join(CXXFLAGS))


def _runtime_object(cc: str) -> Path:
    out = cache_dir() / f"msl_runtime-{_sha(RUNTIME.read_bytes(), cc)}.o"
    if not out.exists():
        tmp = out.with_name(out.name + f".{os.getpid()}.tmp")
        _run([cc, "-std=c++17", "-O2", "-fPIC", "-c", str(RUNTIME), "-o", str(tmp)], "building the emulator runtime")
        os.replace(tmp, out)
    return out


def preprocess(path: Path, include_dirs=()) -> str:
    cc = clang()
    dirs = [path.parent] + [Path(d).resolve() for d in include_dirs]
    cmd = [cc, "-E", "-x", "c++", "-std=c++17", "-nostdinc", "-nostdinc++", "-isystem", str(SHIM)]
    for d in dirs:
        cmd += ["-iquote", str(d)]
    cmd += PREPROCESS_DEFINES + [str(path)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        msg = p.stderr.strip()
        if "file not found" in msg:
            msg += ("\n(the emulator only allows the MSL shim headers <metal_stdlib>, <metal_simdgroup>, ... "
                    "and files in the kernel's directory or the given include_dirs)")
        raise CompileError(f"preprocessing {path} failed:\n{msg}")
    allowed = [str(SHIM)] + [str(d) for d in dirs]
    for m in re.finditer(r'^# \d+ "([^"]+)"', p.stdout, re.M):
        f = m.group(1)
        if f.startswith("<") or any(os.path.abspath(f).startswith(a + os.sep) for a in allowed):
            continue
        raise CompileError(f"{path}: includes {f}, outside the shim and the kernel's include directories")
    return p.stdout


class Module:
    """One compiled .metal file (one build variant)."""

    def __init__(self, so: Path, meta: dict):
        self.so = so
        self.meta = meta
        self.lib = ctypes.CDLL(str(so))
        self.lib.msl_launch.argtypes = [ctypes.c_void_p]
        self.lib.msl_launch.restype = ctypes.c_int
        self.lock = threading.Lock()
        self.kernels = {k["host_name"]: k for k in meta["kernels"]}


def build(path, include_dirs=(), race_check=False) -> Module:
    cc = clang()
    if not cc:
        raise CompileError("clang++-19 not found (apt-get install -y clang-19)")
    path = Path(path).resolve()
    pre = preprocess(path, include_dirs)
    key = _sha(pre, _tool_hash(), cc, race_check)
    with _lock:
        if key in _modules:
            return _modules[key]
        d = cache_dir() / key
        so, meta_p = d / "kernel.so", d / "meta.json"
        if not so.exists() or not meta_p.exists():
            _compile(cc, path, pre, d, race_check)
        mod = Module(so, json.loads(meta_p.read_text()))
        _modules[key] = mod
        return mod


def _compile(cc, path, pre, d: Path, race_check):
    rw = Rewriter(pre)
    src = rw.run()
    work = Path(tempfile.mkdtemp(prefix="msl-", dir=cache_dir()))
    try:
        (work / "kernel.cpp").write_text(src)
        _run([cc, "-x", "c++", *CXXFLAGS, "-O2", "-Xclang", "-disable-llvm-passes", "-S", "-emit-llvm",
              "-gline-tables-only", str(work / "kernel.cpp"), "-o", str(work / "kernel.ll")], f"compiling {path.name}")
        ll = (work / "kernel.ll").read_text()
        check_recursion(ll)
        spaces = {1, 2, 3} if race_check else {1, 2}
        inst, locs = instrument_ir(ll, spaces)
        (work / "kernel.inst.ll").write_text(inst)
        _run([cc, "-O2", "-fPIC", "-Wno-override-module", "-c", str(work / "kernel.inst.ll"), "-o",
              str(work / "kernel.o")], f"optimising {path.name}")
        _run([cc, "-shared", "-fPIC", "-Wl,-Bsymbolic", str(work / "kernel.o"), str(_runtime_object(cc)),
              "-o", str(work / "kernel.so"), "-lm", "-lpthread"], f"linking {path.name}")
        meta = {
            "source": str(path),
            "kernels": [k.__dict__ for k in rw.kernels],
            "function_constants": rw.fcs,
            "race_check": race_check,
            "locations": locs,
        }
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        try:
            os.replace(work, d)
        except OSError:  # another process won the race
            pass
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------
# Launch
# --------------------------------------------------------------------------

class _Buf(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_uint64), ("name", ctypes.c_char_p),
                ("read", ctypes.c_uint64), ("written", ctypes.c_uint64)]


class _Launch(ctypes.Structure):
    _fields_ = [("entry", ctypes.c_void_p), ("kernel", ctypes.c_char_p),
                ("grid", ctypes.c_uint32 * 3), ("tg", ctypes.c_uint32 * 3),
                ("nbuf", ctypes.c_uint32), ("ntgbuf", ctypes.c_uint32),
                ("bufs", ctypes.POINTER(_Buf)), ("tgbuf_sizes", ctypes.POINTER(ctypes.c_uint64)),
                ("race_check", ctypes.c_int32), ("workers", ctypes.c_int32),
                ("stack_size", ctypes.c_uint64), ("tg_limit", ctypes.c_uint64),
                ("locs", ctypes.POINTER(ctypes.c_char_p)), ("nlocs", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                ("err", ctypes.c_char * 8192)]


@dataclass
class Counter:
    name: str
    read: int = 0
    written: int = 0


@dataclass
class LaunchResult:
    counters: dict  # buffer index -> Counter

    @property
    def bytes_read(self) -> int:
        return sum(c.read for c in self.counters.values())

    @property
    def bytes_written(self) -> int:
        return sum(c.written for c in self.counters.values())

    def by_name(self, name: str) -> Counter:
        return next(c for c in self.counters.values() if c.name == name)


def _dim3(v, what):
    v = (v,) if isinstance(v, int) else tuple(v)
    if not 1 <= len(v) <= 3 or any(int(x) < 1 for x in v):
        raise LaunchError(f"{what} must be 1 to 3 positive sizes, got {v}")
    return tuple(int(x) for x in v) + (1,) * (3 - len(v))


class Kernel:
    """A kernel of a compiled .metal file with its function-constant values."""

    def __init__(self, path, name, constants, include_dirs):
        self.path = Path(path).resolve()
        self.include_dirs = tuple(include_dirs)
        self.module = build(self.path, self.include_dirs, race_check=False)
        ks = self.module.kernels
        if name is None:
            if len(ks) != 1:
                raise CompileError(f"{self.path.name} has kernels {sorted(ks)}: pass name=")
            name = next(iter(ks))
        if name not in ks:
            raise CompileError(f"{self.path.name}: no kernel named '{name}' (has: {', '.join(sorted(ks))})")
        self.name = name
        self.info = ks[name]
        fcs = self.module.meta["function_constants"]
        self.constants = {}
        for k, v in (constants or {}).items():
            fc = next((f for f in fcs if f["index"] == k or f["name"] == k), None)
            if fc is None:
                raise CompileError(f"{self.path.name}: no function constant {k!r}")
            self.constants[fc["name"]] = v

    @property
    def params(self):
        return self.info["params"]

    def _set_constants(self, mod: Module):
        fcs = mod.meta["function_constants"]
        addrs = (ctypes.c_void_p * (len(fcs) + 1)).in_dll(mod.lib, "__msl_fc_addr")
        defs = (ctypes.c_void_p * (len(fcs) + 1)).in_dll(mod.lib, "__msl_fc_def")
        for i, fc in enumerate(fcs):
            given = fc["name"] in self.constants
            v = self.constants.get(fc["name"], 0)
            if fc["type"] == "half":
                import numpy as np
                raw = np.float16(v).tobytes()
            else:
                ct = getattr(ctypes, FC_TYPES[fc["type"]])
                raw = bytes(ct(v))
            ctypes.memmove(addrs[i], raw, len(raw))
            ctypes.c_bool.from_address(defs[i]).value = given
        getattr(mod.lib, "__msl_fc_derive")()

    def launch(self, grid, threadgroup, buffers, race_check=False, threadgroup_memory=None, workers=None,
               stack_size=256 * 1024) -> LaunchResult:
        """Run the kernel on a grid of `grid` threadgroups of `threadgroup`
        threads. buffers: list (position = [[buffer(i)]]) or dict {i: value};
        values are C-contiguous numpy arrays (written in place), bytes or ctypes
        objects (set_bytes style). Raises KernelFault on any detected fault."""
        import numpy as np

        grid, tg = _dim3(grid, "grid"), _dim3(threadgroup, "threadgroup")
        nthreads = tg[0] * tg[1] * tg[2]
        limit = min(MAX_THREADS, self.info.get("max_threads") or MAX_THREADS)
        if nthreads > limit:
            raise LaunchError(f"{self.name}: {nthreads} threads per threadgroup exceed the limit of {limit}")
        mod = self.module
        if race_check:
            mod = build(self.path, self.include_dirs, race_check=True)
        info = mod.kernels[self.name]
        if isinstance(buffers, dict):
            bmap = dict(buffers)
        else:
            bmap = {i: b for i, b in enumerate(buffers) if b is not None}
        bparams = {p["index"]: p for p in info["params"] if p["kind"] == "buffer"}
        sizes = (ctypes.c_uint64 * (len(info["params"]) + 1))()
        getattr(mod.lib, info["entry"] + "_sizes")(sizes)
        psize = {p["index"]: sizes[i] for i, p in enumerate(info["params"]) if p["kind"] == "buffer"}
        extra = set(bmap) - set(bparams)
        if extra:
            raise LaunchError(f"{self.name}: no [[buffer(i)]] parameter for buffer(s) {sorted(extra)}")
        nbuf = max(bparams) + 1 if bparams else 0
        bufs = (_Buf * max(nbuf, 1))()
        keep = []
        for i, p in bparams.items():
            if i not in bmap:
                raise LaunchError(f"{self.name}: buffer {i} '{p['name']}' ({p['decl']}) is not bound")
            v = bmap[i]
            if isinstance(v, np.ndarray):
                if not v.flags.c_contiguous:
                    raise LaunchError(f"{self.name}: buffer {i} '{p['name']}': array must be C-contiguous")
                if not v.flags.writeable and p["space"] == "device" and not p["const"]:
                    raise LaunchError(f"{self.name}: buffer {i} '{p['name']}' is written but the array is read-only")
                ptr, size = v.ctypes.data, v.nbytes
            elif isinstance(v, (bytes, bytearray, memoryview)):
                cb = ctypes.create_string_buffer(bytes(v), max(len(v), 1))
                keep.append(cb)
                ptr, size = ctypes.addressof(cb), len(v)
            elif isinstance(v, (ctypes.Structure, ctypes.Array, ctypes.Union)) or hasattr(v, "_b_base_"):
                ptr, size = ctypes.addressof(v), ctypes.sizeof(v)
            else:
                raise LaunchError(f"{self.name}: buffer {i} '{p['name']}': unsupported value type {type(v).__name__}")
            if p["reference"] and size < psize[i]:
                raise LaunchError(f"{self.name}: buffer {i} '{p['name']}' ({p['decl']}) needs {psize[i]} bytes, got {size}")
            name = p["name"].encode()
            keep.append(name)
            bufs[i].ptr, bufs[i].size, bufs[i].name = ptr, size, name
            keep.append(v)
        tgparams = [p for p in info["params"] if p["kind"] == "threadgroup"]
        ntg = max((p["index"] for p in tgparams), default=-1) + 1
        tgsizes = (ctypes.c_uint64 * max(ntg, 1))()
        for idx, nbytes in (threadgroup_memory or {}).items():
            if idx >= ntg:
                raise LaunchError(f"{self.name}: no [[threadgroup({idx})]] parameter")
            tgsizes[idx] = nbytes
        for p in tgparams:
            if not tgsizes[p["index"]]:
                raise LaunchError(f"{self.name}: threadgroup buffer {p['index']} '{p['name']}' needs a size "
                                  "(threadgroup_memory={index: bytes})")
        L = _Launch()
        L.entry = ctypes.cast(getattr(mod.lib, info["entry"]), ctypes.c_void_p).value
        kname = self.name.encode()
        L.kernel = kname
        L.grid[:] = grid
        L.tg[:] = tg
        L.nbuf, L.ntgbuf = nbuf, ntg
        L.bufs, L.tgbuf_sizes = bufs, tgsizes
        L.race_check = int(bool(race_check))
        L.workers = workers or os.cpu_count() or 1
        L.stack_size = stack_size
        L.tg_limit = TG_LIMIT
        locs = mod.meta.get("locations", [""])
        loc_arr = (ctypes.c_char_p * len(locs))(*[x.encode() for x in locs])
        L.locs, L.nlocs = loc_arr, len(locs)
        with mod.lock:
            self._set_constants(mod)
            rc = mod.lib.msl_launch(ctypes.byref(L))
        if rc:
            raise KernelFault(L.err.decode(errors="replace"))
        return LaunchResult({i: Counter(bparams[i]["name"], bufs[i].read, bufs[i].written) for i in sorted(bparams)})


def compile(path, name=None, constants=None, include_dirs=()) -> Kernel:  # noqa: A001 (mirrors MTLLibrary)
    """Compile (cached) `path` and return the kernel `name` (its host_name, or
    function name for non-template kernels) with the given function constants
    ({index or name: value})."""
    return Kernel(path, name, constants, include_dirs)
