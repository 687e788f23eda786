"""Encryption at rest of the agent's store and staging (R8): `[store] encrypt = "sm4-gcm" | "aes-256-gcm"`.

An encrypted file is a 32-byte header, then the plaintext in fixed blocks (`BLOCK_PLAIN`, recorded in the
header), each sealed on its own: a random 96-bit nonce, the ciphertext, a 128-bit GCM tag. Each block's
associated data binds the header, the file id, the block's index and whether it is the last, so a block cannot be
changed, swapped with another, moved to another file, nor the file cut short, without its tag failing. A read at
any offset decrypts only the blocks it spans; memory is one block whatever the file size.

    header: magic "EAGTENC\\n" (8) | version u8 = 1 | algorithm u8 (1 aes-256-gcm, 2 sm4-gcm) | 0 u16
            | plaintext block size u32 (big-endian) | key id (16)
    block:  nonce (12) | ciphertext (= its plaintext's length) | tag (16);  at least one block (an empty file
            has one empty block), every block but the last holds exactly `block size` plaintext bytes.
    aad:    header (32) | file id (UTF-8) | block index u64 | last u8

The key is one 256-bit secret in a file (64 hex digits, `openssl rand -hex 32`), mode 0600, outside the data
dir; each algorithm uses its own key derived from it with HKDF (SHA-256 for AES-256, SM3 for SM4: 128 bits), and
the key id in every header is derived from it too (it says which key, not the key). Under systemd the key comes
as the credential `edge-agent.store-key` (`LoadCredential=`, `$CREDENTIALS_DIRECTORY`), which wins over
`key_file`.

Which stored files are encrypted is in their name (`is_encrypted`): `<file id>_enc<suffix>`, staging
`<file id>_enc.part`. A plaintext name is the bare file id and a suffix, so the two cannot be confused, and a
store whose setting changed keeps reading both kinds.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MAGIC = b"EAGTENC\n"
VERSION = 1
ALGORITHMS = {"aes-256-gcm": 1, "sm4-gcm": 2}
ALGORITHM_NAMES = {number: name for name, number in ALGORITHMS.items()}
HEADER = struct.Struct(">8sBBHI16s")
HEADER_SIZE = HEADER.size          # 32
NONCE, TAG = 12, 16
BLOCK_PLAIN = 256 * 1024           # plaintext per block: divides the default 512 KiB sync chunk, so a chunk
                                   # read decrypts no block it does not return
MAX_BLOCK_PLAIN = 16 * 1024 * 1024
ENCRYPTED_MARK = "_enc"            # in a stored file's name after the file id
CREDENTIAL = "edge-agent.store-key"   # the systemd credential that carries the key (/etc/credstore/<this>)


class AtRestError(Exception):
    """An encrypted stored file cannot be read: no usable key, or it fails authentication."""


class StoreKeyError(AtRestError, PermissionError):
    """The store key is missing, unreadable, malformed or readable by others: the message says what to do. A
    PermissionError, so the commands that refuse a data dir open to all users refuse this the same way."""


class Tampered(AtRestError):
    """An encrypted stored file (or one of its blocks) fails authentication: altered on disk."""

    def __init__(self, path: Path | str, message: str, block: int | None = None):
        self.path = str(path)
        self.block = block
        super().__init__(f"{path}: {message}")


def is_encrypted(path: Path | str) -> bool:
    """True for a stored or staging file written encrypted (its name says so: see the module docstring)."""
    return Path(path).name.split(".", 1)[0].endswith(ENCRYPTED_MARK)


def encrypted_name(file_id: str, suffix: str) -> str:
    """The name of an encrypted stored file: `<file id>_enc<suffix>`."""
    return f"{file_id}{ENCRYPTED_MARK}{suffix}"


def _derive(secret: bytes, info: bytes, length: int, algorithm: hashes.HashAlgorithm) -> bytes:
    return HKDF(algorithm=algorithm, length=length, salt=None, info=b"edge-agent store " + info).derive(secret)


class StoreKey:
    """The store's secret, with the per-algorithm keys and the key id derived from it."""

    def __init__(self, secret: bytes):
        if len(secret) != 32:
            raise StoreKeyError(f"the store key is {len(secret)} bytes, not 32")
        self.key_id = _derive(secret, b"key id", 16, hashes.SHA256())
        self._keys = {1: _derive(secret, b"aes-256-gcm", 32, hashes.SHA256()),
                      2: _derive(secret, b"sm4-gcm", 16, hashes.SM3())}
        self._aes = AESGCM(self._keys[1])

    @property
    def key_id_hex(self) -> str:
        return self.key_id.hex()

    def seal(self, algorithm: int, nonce: bytes, data: bytes | memoryview, aad: bytes) -> bytes:
        """Ciphertext and tag of `data`."""
        if algorithm == 1:
            return self._aes.encrypt(nonce, bytes(data), aad)
        encryptor = Cipher(algorithms.SM4(self._keys[2]), modes.GCM(nonce)).encryptor()
        encryptor.authenticate_additional_data(aad)
        out = encryptor.update(data) + encryptor.finalize()
        return out + encryptor.tag

    def open(self, algorithm: int, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
        """Plaintext of `sealed` (ciphertext and tag); InvalidTag if it fails authentication."""
        if algorithm == 1:
            return self._aes.decrypt(nonce, sealed, aad)
        decryptor = Cipher(algorithms.SM4(self._keys[2]), modes.GCM(nonce, sealed[-TAG:])).decryptor()
        decryptor.authenticate_additional_data(aad)
        return decryptor.update(sealed[:-TAG]) + decryptor.finalize()


def read_key_file(path: Path, *, private: bool = True) -> StoreKey:
    """The store key in `path` (64 hex digits); StoreKeyError, saying what to do, if it is missing, not a
    regular file, readable or writable by group or others (with `private`), or malformed. A systemd credential is
    read without `private`: systemd makes it the unit user's alone (by owner, or by an ACL that shows as group
    bits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StoreKeyError(f"store key {path} cannot be opened ({exc.strerror}); create it with: "
                            f"umask 077; openssl rand -hex 32 > {path} (docs/OPERATIONS.md, "
                            "\"Encryption at rest\")") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StoreKeyError(f"store key {path} is not a regular file")
        if private and st.st_mode & 0o077:
            raise StoreKeyError(f"store key {path} is readable or writable by others (mode "
                                f"{st.st_mode & 0o777:o}); run: chmod 600 {path}")
        text = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != 32:
        raise StoreKeyError(f"store key {path} is not 64 hex digits (256 bits); make a new one only for a new "
                            f"store: openssl rand -hex 32 > {path}")
    return StoreKey(secret)


class AtRest:
    """The store's encryption setting (`encrypt`: an algorithm name, or None for plaintext) and its key, read
    from `key_file` (or the systemd credential) on first use and kept. `data_dir`: the key may not be in it."""

    def __init__(self, encrypt: str | None = None, key_file: Path | None = None, data_dir: Path | None = None,
                 block_plain: int = BLOCK_PLAIN):
        if encrypt is not None and encrypt not in ALGORITHMS:
            raise ValueError(f"unknown store encryption {encrypt!r}; use one of {', '.join(ALGORITHMS)}")
        self.encrypt = encrypt
        self.key_file = key_file
        self.data_dir = data_dir
        self.block_plain = block_plain
        self._key: StoreKey | None = None
        self._lock = threading.Lock()

    @property
    def encrypting(self) -> bool:
        return self.encrypt is not None

    def key_path(self) -> Path | None:
        """Where the key is read from: the systemd credential if the unit passed one, else `key_file`."""
        return _credential() or self.key_file

    def key(self) -> StoreKey:
        """The store key (read once); StoreKeyError saying what to do when there is none usable."""
        with self._lock:
            if self._key is None:
                path = self.key_path()
                if path is None:
                    raise StoreKeyError("the store is (or was) encrypted but no key is configured: set [store] "
                                        f"key_file (or pass the systemd credential {CREDENTIAL}); see "
                                        "docs/OPERATIONS.md, \"Encryption at rest\"")
                if self.data_dir is not None and _inside(path, self.data_dir):
                    raise StoreKeyError(f"store key {path} is inside the data dir {self.data_dir}: keep it "
                                        "outside (e.g. /etc/edge-agent/store.key), or a copy of the data dir "
                                        "carries its own key")
                self._key = read_key_file(path, private=path != _credential())
            return self._key

    def writer(self, fd: int, file_id: str) -> BlockWriter:
        """A writer of `file_id`'s encrypted copy into `fd` (encryption must be on)."""
        assert self.encrypt is not None
        return BlockWriter(fd, file_id, self.key(), ALGORITHMS[self.encrypt], self.block_plain)

    def reader(self, path: Path | str, file_id: str) -> PlainReader:
        """A reader of the plaintext of the encrypted file at `path`, stored as `file_id`."""
        return PlainReader(path, file_id, self)


def _credential() -> Path | None:
    """The key systemd passed the unit (LoadCredential=), if it did."""
    credentials = os.environ.get("CREDENTIALS_DIRECTORY")
    if credentials and (Path(credentials) / CREDENTIAL).is_file():
        return Path(credentials) / CREDENTIAL
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.realpath(path)).relative_to(os.path.realpath(folder))
    except ValueError:
        return False
    return True


def _header(algorithm: int, block_plain: int, key_id: bytes) -> bytes:
    return HEADER.pack(MAGIC, VERSION, algorithm, 0, block_plain, key_id)


def _aad(header: bytes, file_id: bytes, index: int, last: bool) -> bytes:
    return header + file_id + struct.pack(">QB", index, 1 if last else 0)


def _write_all(fd: int, data: bytes) -> None:
    view, written = memoryview(data), 0
    while written < len(view):
        written += os.write(fd, view[written:])


class BlockWriter:
    """Encrypts a stream of plaintext into `fd`: `write` as the bytes come, `close` once at the end (it seals the
    last block, marked last). Writes the header at once. Holds at most one block of plaintext."""

    def __init__(self, fd: int, file_id: str, key: StoreKey, algorithm: int, block_plain: int):
        self._fd = fd
        self._key = key
        self._algorithm = algorithm
        self._block = block_plain
        self._header = _header(algorithm, block_plain, key.key_id)
        self._file_id = file_id.encode("utf-8")
        self._pending = bytearray()
        self._index = 0
        self.written = HEADER_SIZE    # ciphertext bytes written so far
        _write_all(fd, self._header)

    def _seal(self, data: bytes | memoryview, last: bool) -> None:
        nonce = os.urandom(NONCE)
        sealed = self._key.seal(self._algorithm, nonce, data, _aad(self._header, self._file_id, self._index, last))
        _write_all(self._fd, nonce + sealed)
        self.written += NONCE + len(sealed)
        self._index += 1

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            # A full block is sealed only once more bytes follow it: the last block must be marked last.
            if len(self._pending) == self._block:
                self._seal(self._pending, last=False)
                self._pending.clear()
            take = min(self._block - len(self._pending), len(view))
            self._pending += view[:take]
            view = view[take:]

    def close(self) -> None:
        """Seal what is left as the last block (an empty file gets one empty block)."""
        self._seal(self._pending, last=True)
        self._pending.clear()


class PlainReader:
    """The plaintext of one encrypted stored file, by block (`block`), by range (`pread`) or in order (`blocks`).
    Every block is authenticated before a byte of it is returned; a failure is `Tampered`, naming the file and
    the block. `size` is the plaintext size the file's length implies. Use as a context manager."""

    def __init__(self, path: Path | str, file_id: str, at_rest: AtRest):
        self.path = Path(path)
        self._file_id = file_id.encode("utf-8")
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._read_header(at_rest)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self, at_rest: AtRest) -> None:
        header = os.pread(self._fd, HEADER_SIZE, 0)
        if len(header) < HEADER_SIZE:
            raise Tampered(self.path, "encrypted file shorter than its header: cut short")
        magic, version, algorithm, _zero, block, key_id = HEADER.unpack(header)
        if magic != MAGIC or version != VERSION or algorithm not in ALGORITHM_NAMES or not 0 < block <= MAX_BLOCK_PLAIN:
            raise Tampered(self.path, "not an encrypted store file of a known version (header altered)")
        key = at_rest.key()
        if key_id != key.key_id:
            raise StoreKeyError(f"{self.path} was encrypted under store key {key_id.hex()}, but the key configured "
                                f"is {key.key_id_hex}: restore the key the file was written with")
        self._header, self._key, self._algorithm, self.block_plain = header, key, algorithm, block
        self.algorithm = ALGORITHM_NAMES[algorithm]
        body = os.fstat(self._fd).st_size - HEADER_SIZE
        stride = NONCE + block + TAG
        self.blocks_count = max(1, -(-body // stride))
        last = body - (self.blocks_count - 1) * stride - NONCE - TAG
        if body < NONCE + TAG or not 0 <= last <= block:
            raise Tampered(self.path, f"encrypted file length {body + HEADER_SIZE} is not a whole number of blocks: "
                                      "cut short or extended", block=self.blocks_count - 1)
        self.size = (self.blocks_count - 1) * block + last
        self._stride = stride
        self._cached: tuple[int, bytes] | None = None

    def __enter__(self) -> PlainReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def fileno(self) -> int:
        return self._fd

    def _block_length(self, index: int) -> int:
        return self.size - index * self.block_plain if index == self.blocks_count - 1 else self.block_plain

    def block(self, index: int) -> bytes:
        """Block `index`'s plaintext, authenticated."""
        if self._cached is not None and self._cached[0] == index:
            return self._cached[1]
        length = NONCE + self._block_length(index) + TAG
        raw = os.pread(self._fd, length, HEADER_SIZE + index * self._stride)
        if len(raw) != length:
            raise Tampered(self.path, f"block {index} is cut short", block=index)
        last = index == self.blocks_count - 1
        try:
            plain = self._key.open(self._algorithm, raw[:NONCE], raw[NONCE:],
                                   _aad(self._header, self._file_id, index, last))
        except InvalidTag:
            raise Tampered(self.path, f"block {index} (plaintext bytes {index * self.block_plain}.."
                                      f"{index * self.block_plain + self._block_length(index)}) fails its "
                                      f"{self.algorithm} tag: altered, moved from elsewhere, or the file was cut "
                                      "short", block=index) from None
        self._cached = (index, plain)
        return plain

    def pread(self, length: int, offset: int) -> bytes:
        """Up to `length` plaintext bytes from `offset` (fewer at the end), decrypting only the blocks spanned."""
        end = min(offset + length, self.size)
        out = bytearray()
        while offset < end:
            index, within = divmod(offset, self.block_plain)
            piece = self.block(index)[within:within + end - offset]
            out += piece
            offset += len(piece)
        return bytes(out)

    def blocks(self) -> Iterator[memoryview]:
        """Every block's plaintext in order."""
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError:
            pass
        for index in range(self.blocks_count):
            yield memoryview(self.block(index))


class PlainFile(io.RawIOBase):
    """A seekable, read-only file object over a `PlainReader` (for PyAV's probe and for copies)."""

    def __init__(self, reader: PlainReader):
        super().__init__()
        self._reader = reader
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._reader.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._reader.pread(len(buffer), self._pos)
        memoryview(buffer).cast("B")[:len(data)] = data
        self._pos += len(data)
        return len(data)

    def close(self) -> None:
        self._reader.close()
        super().close()
