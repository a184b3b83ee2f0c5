"""The decode-attention kernel's parameter struct, checked on the CPU (no GPU, no CuPy needed).

The kernel takes ``NqAttnParams`` (cuda/nexusquant.cu) by value; Python packs it with one
``struct.pack_into`` whose format comes from ``ATTN_PARAM_FIELDS``. A field reordered, added or
retyped on one side only would make the kernel read garbage without any error, so these tests read
the C definition and the Python call site and compare them field by field.
"""

from __future__ import annotations

import ast
import inspect
import re
import struct

from nexusquant.gpu import attention, kernel_source_path

# C scalar types of the struct and their struct codes; any pointer is "Q" (8 bytes on x86-64/aarch64).
_C_SCALARS = {"long long": "q", "unsigned long long": "Q", "int": "i", "unsigned": "I", "float": "f", "double": "d"}


def _struct_bodies(src: str) -> dict[str, str]:
    src = re.sub(r"//[^\n]*", "", src)
    return {m.group(1): m.group(2) for m in re.finditer(r"\bstruct\s+(\w+)\s*\{(.*?)\};", src, flags=re.S)}


def _c_fields(bodies: dict[str, str], name: str, prefix: str = "") -> tuple[list[tuple[str, str, bool, int]], int, int]:
    """Fields of C struct ``name`` flattened into (access path, struct code, is pointer, offset), with
    the struct's size and alignment, by the C rules (natural alignment, size padded to alignment)."""
    fields: list[tuple[str, str, bool, int]] = []
    offset, align = 0, 1
    for decl in bodies[name].split(";"):
        decl = " ".join(decl.split())
        if not decl:
            continue
        first, *more = [part.strip() for part in decl.split(",")]
        m = re.fullmatch(r"(.*?)([A-Za-z_]\w*)(?:\[(\d+)\])?", first)
        assert m, decl
        ctype = " ".join(m.group(1).replace("*", " * ").split())
        declarators = [(m.group(2), m.group(3))]
        for d in more:
            dm = re.fullmatch(r"([A-Za-z_]\w*)(?:\[(\d+)\])?", d)
            assert dm, f"unsupported declarator {d!r} in {decl!r}"
            declarators.append((dm.group(1), dm.group(2)))
        for field, count in declarators:
            for i in range(int(count) if count else 1):
                path = prefix + field + (f"[{i}]" if count else "")
                if ctype in bodies:  # a nested struct
                    sub, size, sub_align = _c_fields(bodies, ctype, path + ".")
                    offset = -(-offset // sub_align) * sub_align
                    fields += [(p, c, ptr, offset + o) for p, c, ptr, o in sub]
                    offset += size
                    align = max(align, sub_align)
                    continue
                is_ptr = "*" in ctype
                code = "Q" if is_ptr else _C_SCALARS[ctype.replace("const ", "")]
                size = struct.calcsize(code)
                offset = -(-offset // size) * size
                fields.append((path, code, is_ptr, offset))
                offset += size
                align = max(align, size)
    return fields, -(-offset // align) * align, align


def _static_sizes(src: str) -> dict[str, int]:
    sizes = {}
    for m in re.finditer(r"static_assert\((.*?)\);", src, flags=re.S):
        sizes.update({k: int(v) for k, v in re.findall(r"sizeof\((\w+)\)\s*==\s*(\d+)", m.group(1))})
    return sizes


def test_attn_param_fields_match_the_c_struct():
    """Names (C access paths), order, types and offsets of ATTN_PARAM_FIELDS against NqAttnParams,
    and both struct sizes against the kernel's static_assert."""
    src = kernel_source_path().read_text(encoding="utf-8")
    bodies = _struct_bodies(src)
    c_fields, c_size, _ = _c_fields(bodies, "NqAttnParams")
    tier_fields, tier_size, _ = _c_fields(bodies, "NqTier")
    py = attention.ATTN_PARAM_FIELDS
    assert [(p, c) for p, c, _, _ in c_fields] == list(py)
    assert len({p for p, _ in py}) == len(py)
    assert [(p, c) for p, c, _, _ in tier_fields] == list(attention.TIER_FIELDS)
    assert sum(p.startswith("tier[") and p.endswith("].kcodes") for p, _ in py) == attention.MAX_TIERS
    # "<" packs without padding: every field must already sit at its C offset.
    fmt = "<" + "".join(c for _, c in py)
    py_offsets = [struct.calcsize("<" + "".join(c for _, c in py[:i])) for i in range(len(py))]
    assert py_offsets == [o for _, _, _, o in c_fields]
    sizes = _static_sizes(src)
    assert sizes["NqAttnParams"] == c_size == struct.calcsize(fmt) == attention._ATTN_PARAMS.size
    assert sizes["NqTier"] == tier_size
    assert attention._ATTN_PARAMS.format == fmt


def _tier_locals(tree: ast.Module) -> list[str]:
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_tier_params")
    ret = fn.body[-1]
    assert isinstance(ret, ast.Return) and isinstance(ret.value, ast.Tuple), "_tier_params must end returning a tuple"
    names = [e.id for e in ret.value.elts if isinstance(e, ast.Name)]
    assert len(names) == len(ret.value.elts), "_tier_params must return plain locals, one per field"
    kw = [a.arg for a in fn.args.kwonlyargs]
    assert kw == [n for n in names if not n.endswith("_ptr")], "its keyword parameters are the scalar fields"
    return names


def test_decode_attention_packs_in_field_order():
    """The one pack_into call passes a local per field, named after it (``<field>_ptr`` exactly for
    the pointers), in ATTN_PARAM_FIELDS order; the tiers' fields come from _tier_params, named the
    same way and filled by keyword."""
    src = inspect.getsource(attention)
    tree = ast.parse(src)
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "pack_into"
        and isinstance(n.func.value, ast.Name)
        and n.func.value.id == "_ATTN_PARAMS"
    ]
    assert len(calls) == 1
    call = calls[0]
    assert isinstance(call.args[1], ast.Constant) and call.args[1].value == 0
    tier_locals = _tier_locals(tree)
    passed: list[str] = []
    for arg in call.args[2:]:
        if isinstance(arg, ast.Starred):
            assert isinstance(arg.value, ast.Name)
            m = re.fullmatch(r"tier(\d+)", arg.value.id)
            assert m, f"*{arg.value.id}: only the tiers are unpacked"
            passed += [f"tier[{m.group(1)}].{n}" for n in tier_locals]
        else:
            assert isinstance(arg, ast.Name), ast.unparse(arg)
            passed.append(arg.id)
    src_c = kernel_source_path().read_text(encoding="utf-8")
    c_fields, _, _ = _c_fields(_struct_bodies(src_c), "NqAttnParams")
    want = [p + ("_ptr" if is_ptr else "") for p, _, is_ptr, _ in c_fields]
    assert passed == want
    # tier0, tier1, ...: each assigned only from _tier_params, by keyword.
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "decode_attention")
    tier_assigns = [
        n
        for n in ast.walk(fn)
        if isinstance(n, ast.Assign) and any(re.fullmatch(r"tier\d+", ast.unparse(t)) for t in n.targets)
    ]
    assert tier_assigns
    for a in tier_assigns:
        assert isinstance(a.value, ast.Call) and ast.unparse(a.value.func) == "_tier_params", ast.unparse(a)
        assert len(a.value.args) == 1, "only the tier positionally; its scalar fields by keyword"


def test_coded_tier_fields():
    """decode attention and its reference read tiers by these names; nexusquant.attention builds
    them positionally in this order."""
    assert attention.CodedTier._fields == (
        "key_codes",
        "key_scales",
        "value_codes",
        "value_scales",
        "valid",
        "key_codec",
        "value_codec",
    )
