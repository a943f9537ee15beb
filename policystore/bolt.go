package policystore

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"runtime/debug"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"stsmap/policycache"
)

// Layout of a Bolt file: bucket "policies" maps a domain to its Encode'd
// entry; bucket "meta" holds "format", the layout's version.
var (
	boltPolicies = []byte("policies")
	boltMeta     = []byte("meta")
	boltFormat   = []byte("format")
)

// boltFormatVersion is the layout this stsmap writes and reads. A new
// layout gets a new number, and an older stsmap refuses the file rather
// than misreading it.
const boltFormatVersion = "1"

// boltLockTimeout is how long OpenBolt waits for the file lock another
// process holds.
const boltLockTimeout = 2 * time.Second

// Bolt is a policycache.Store in an embedded bbolt file, so that a restart
// loses no policy (SPEC 6.3: a valid cached policy is applied when live
// discovery fails, also right after a restart; SPEC 8.1: state persists).
// Every change is on disk (fsync) when its method returns. It is safe for
// concurrent use; one process at a time holds the file.
type Bolt struct {
	db         *bolt.DB
	path       string
	log        *slog.Logger
	movedAside string
}

var _ policycache.Store = (*Bolt)(nil)

// OpenBolt opens the bbolt file at path, creating it (mode 0600) and its
// directory (mode 0700) when missing. A nil log means slog.Default().
//
// A damaged file (bad magic or checksum, truncated, empty, or bbolt panics
// while reading it) is renamed to path+".corrupt-<UTC time>" and a new,
// empty store is created: the cache is rebuilt by discovery, and the old
// bytes stay for a post-mortem. MovedAside then names the renamed file, for
// the caller to log. A file another process holds, a file that cannot be
// read for want of permission, one written by a newer stsmap and a bbolt
// file that is not an stsmap store are errors and are left alone.
func OpenBolt(path string, log *slog.Logger) (*Bolt, error) {
	if log == nil {
		log = slog.Default()
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, boltOpenError(path, err)
	}
	b := &Bolt{path: path, log: log}
	fresh := false
	err := boltVerify(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		fresh = true
	case err != nil:
		damage := boltDamaged(err)
		if damage == nil {
			return nil, err
		}
		if b.movedAside, err = b.moveAside(damage); err != nil {
			return nil, err
		}
		fresh = true
	}

	db, err := boltOpenChecked(path, !fresh)
	if damage := boltDamaged(err); damage != nil && !fresh {
		// Rare: damage in the freelist, which only the writable open
		// and bbolt's Check read.
		if b.movedAside, err = b.moveAside(damage); err != nil {
			return nil, err
		}
		fresh = true
		db, err = boltOpenChecked(path, false)
	}
	if err != nil {
		return nil, err
	}
	if fresh {
		// A new file's directory entry must survive a crash, too.
		if err := boltSyncDir(filepath.Dir(path)); err != nil {
			db.Close()
			return nil, fmt.Errorf("policystore: %s: %w", path, err)
		}
	}
	if err := boltInit(db, path); err != nil {
		db.Close()
		return nil, err
	}
	b.db = db
	return b, nil
}

// MovedAside names the file a damaged store was renamed to by OpenBolt, or
// is empty.
func (b *Bolt) MovedAside() string { return b.movedAside }

// Load calls fn for every stored entry unexpired at now (SPEC 6.2: an
// expired policy is never served) and deletes the expired ones and those
// that do not decode, in one transaction at the end. fn is called after the
// read transaction ended, so it may use the store. A record that bbolt
// panics on reading (a page damaged since OpenBolt) makes Load return an
// error wrapping ErrCorrupt without calling fn.
func (b *Bolt) Load(ctx context.Context, now time.Time, fn func(*policycache.Entry)) error {
	var (
		entries     []*policycache.Entry
		prune       [][]byte // expired or damaged
		damaged     int
		firstDamage error
		expired     int
		scanned     int
	)
	if err := ctx.Err(); err != nil {
		return err
	}
	err := boltRecover(func() error {
		return b.db.View(func(tx *bolt.Tx) error {
			c := tx.Bucket(boltPolicies).Cursor()
			for k, v := c.First(); k != nil; k, v = c.Next() {
				if scanned++; scanned%1024 == 0 && ctx.Err() != nil {
					return ctx.Err()
				}
				e, err := decodeKeyed(k, v)
				switch {
				case err != nil:
					damaged++
					if firstDamage == nil {
						firstDamage = err
					}
					prune = append(prune, append([]byte(nil), k...))
				case !now.Before(e.Expires):
					expired++
					prune = append(prune, append([]byte(nil), k...))
				default:
					entries = append(entries, e)
				}
			}
			return nil
		})
	})
	if err != nil {
		return fmt.Errorf("policystore: loading %s: %w", b.path, err)
	}
	if damaged > 0 {
		b.log.Warn("stored policies that do not decode were dropped", "path", b.path,
			"count", damaged, "err", firstDamage.Error())
	}
	if len(prune) > 0 {
		if err := b.db.Update(func(tx *bolt.Tx) error {
			bk := tx.Bucket(boltPolicies)
			for _, k := range prune {
				// A Put since the scan may have renewed the entry.
				if e, err := decodeKeyed(k, bk.Get(k)); err == nil && now.Before(e.Expires) {
					continue
				}
				err := bk.Delete(k)
				if errors.Is(err, berrors.ErrIncompatibleValue) {
					err = bk.DeleteBucket(k) // a nested bucket, never ours
				}
				if err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			return fmt.Errorf("policystore: pruning %s: %w", b.path, err)
		}
	}
	b.log.Debug("stored policies loaded", "path", b.path, "count", len(entries), "expired", expired)
	for _, e := range entries {
		fn(e)
	}
	return nil
}

// Get returns the stored entry of domain, or nil and no error when there is
// none. A record that does not decode is an error wrapping ErrCorrupt.
func (b *Bolt) Get(ctx context.Context, domain string) (*policycache.Entry, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	var e *policycache.Entry
	err := b.db.View(func(tx *bolt.Tx) error {
		v := tx.Bucket(boltPolicies).Get([]byte(domain))
		if v == nil {
			return nil
		}
		var err error
		e, err = decodeKeyed([]byte(domain), v) // Decode copies out of the mmap
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("policystore: get %s: %w", clip(domain), err)
	}
	return e, nil
}

// Put stores e, replacing the domain's entry; it is on disk when Put
// returns. Concurrent Puts share one commit and fsync (bbolt's Batch). An
// entry that Load would not read back (no policy, a field out of range) is
// refused. ctx is checked before writing: a commit cannot be abandoned.
func (b *Bolt) Put(ctx context.Context, e *policycache.Entry) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	v, err := Encode(e)
	if err != nil {
		return err
	}
	if _, err := Decode(v); err != nil {
		return fmt.Errorf("policystore: refusing to store an entry that would not load: %w", err)
	}
	if err := b.db.Batch(func(tx *bolt.Tx) error {
		return tx.Bucket(boltPolicies).Put([]byte(e.Domain), v)
	}); err != nil {
		return fmt.Errorf("policystore: put %s: %w", clip(e.Domain), err)
	}
	return nil
}

// Delete removes the domain's entry, durably; a missing one is no error.
func (b *Bolt) Delete(ctx context.Context, domain string) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if domain == "" {
		return nil // never stored: bbolt has no empty key
	}
	if err := b.db.Batch(func(tx *bolt.Tx) error {
		return tx.Bucket(boltPolicies).Delete([]byte(domain))
	}); err != nil {
		return fmt.Errorf("policystore: delete %s: %w", clip(domain), err)
	}
	return nil
}

// Claim always grants the refresh: a local store has no other process to
// share the work with (policycache.Store).
func (b *Bolt) Claim(context.Context, string, time.Duration) (bool, error) {
	return true, nil
}

// Close closes the file and releases its lock. A commit under way
// completes first; a Put still waiting for its batch then fails.
func (b *Bolt) Close() error {
	return b.db.Close()
}

// decodeKeyed decodes a stored record and checks that it belongs under its
// key: a record filed under another domain would be served for the wrong
// domain.
func decodeKeyed(k, v []byte) (*policycache.Entry, error) {
	if v == nil {
		return nil, fmt.Errorf("%w: %s: nested bucket", ErrCorrupt, clip(string(k)))
	}
	e, err := Decode(v)
	if err != nil {
		return nil, err
	}
	if e.Domain != string(k) {
		return nil, fmt.Errorf("%w: record of %s stored under %s", ErrCorrupt, clip(e.Domain), clip(string(k)))
	}
	return e, nil
}

// boltDamage says why a file is taken for damaged.
type boltDamage struct{ reason string }

func (d *boltDamage) Error() string { return "damaged bbolt file: " + d.reason }

// boltDamaged returns the damage err reports, or nil: a *boltDamage, or a
// panic that boltRecover took back.
func boltDamaged(err error) *boltDamage {
	var d *boltDamage
	switch {
	case errors.As(err, &d):
		return d
	case errors.Is(err, ErrCorrupt):
		return &boltDamage{reason: err.Error()}
	}
	return nil
}

// boltVerify checks an existing file before it is opened for writing, in a
// read-only open that takes a shared lock: that the meta pages are valid,
// that the file holds every page they count (a truncated file would make
// bbolt fault on reading past its end), and that every page of the tree
// reads. bbolt trusts the file's page numbers and sizes; a damaged one
// makes it panic, or fault on memory past the mapping, which boltRecover
// takes back. The reading happens here, in this goroutine: bbolt's own
// Check runs in a goroutine of its own, where a fault would kill the
// process.
//
// It returns an error matching fs.ErrNotExist for a missing file; for a
// damaged one, an error boltDamaged recognises.
func boltVerify(path string) error {
	fi, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return err
	case err != nil:
		return boltOpenError(path, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("policystore: %s is not a regular file; set cache.path to a file", path)
	case fi.Size() == 0:
		// Not a store: bbolt writes its first pages, synced, before
		// the file is used, so this one lost its content (or was
		// never written: then moving it aside loses nothing). It is
		// not locked to be looked at: only a second stsmap creating
		// the same file at the same instant could be disturbed.
		return &boltDamage{reason: "empty file"}
	}
	db, err := boltOpen(path, true)
	if err != nil {
		return err
	}
	err = boltRecover(func() error {
		return db.View(func(tx *bolt.Tx) error {
			if tx.Size() > fi.Size() {
				return &boltDamage{reason: fmt.Sprintf("truncated: %d bytes, its meta page counts %d", fi.Size(), tx.Size())}
			}
			return tx.ForEach(func(_ []byte, bk *bolt.Bucket) error {
				return boltReadAll(bk)
			})
		})
	})
	if cerr := db.Close(); err == nil && cerr != nil {
		err = fmt.Errorf("policystore: %s: %w", path, cerr)
	}
	return err
}

// boltReadAll reads every key and value of bk and its nested buckets, so
// that a damaged page panics now rather than during Load or a Put.
func boltReadAll(bk *bolt.Bucket) error {
	crc := crc32.NewIEEE()
	c := bk.Cursor()
	for k, v := c.First(); k != nil; k, v = c.Next() {
		crc.Write(k)
		if v != nil {
			crc.Write(v)
			continue
		}
		if child := bk.Bucket(k); child != nil {
			if err := boltReadAll(child); err != nil {
				return err
			}
		}
	}
	return nil
}

// boltOpenChecked opens path for writing. With check, it runs bbolt's
// consistency check (freelist against tree), which boltVerify left out:
// bolt.Open reads the freelist here, in this goroutine, so Check's own
// goroutine touches only pages boltVerify has read.
func boltOpenChecked(path string, check bool) (*bolt.DB, error) {
	db, err := boltOpen(path, false)
	if err != nil || !check {
		return db, err
	}
	err = db.View(func(tx *bolt.Tx) error {
		var first error
		for err := range tx.Check() { // drain: Check's goroutine sends them all
			if first == nil {
				first = err
			}
		}
		if first != nil {
			return &boltDamage{reason: first.Error()}
		}
		return nil
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return db, nil
}

// boltOpen is bolt.Open with the lock timeout, its errors told apart for
// the operator (boltClassify), and a panic on a damaged file taken back.
//
// Fsync stays on (NoSync false): a commit is on disk when it returns, so
// kill -9 or a power cut loses no stored policy. The freelist is synced
// too (NoFreelistSync false): otherwise every open rebuilds it by walking
// the whole file in a goroutine of bbolt's, where a damaged page would
// crash the process.
func boltOpen(path string, readOnly bool) (*bolt.DB, error) {
	var (
		db   *bolt.DB
		file *os.File
	)
	opts := &bolt.Options{ReadOnly: readOnly, Timeout: boltLockTimeout,
		OpenFile: func(name string, flag int, perm os.FileMode) (*os.File, error) {
			f, err := os.OpenFile(name, flag, perm)
			file = f
			return f, err
		}}
	err := boltRecover(func() error {
		var err error
		db, err = bolt.Open(path, 0o600, opts)
		return err
	})
	switch {
	case err == nil:
		return db, nil
	case errors.Is(err, ErrCorrupt):
		// bolt.Open panicked and left the file open: close it, which
		// releases the lock. Its mapping stays until the process ends.
		if file != nil {
			file.Close()
		}
		return nil, err
	}
	return nil, boltClassify(path, err)
}

// boltRecover runs fn, turning a panic, or a fault on the file's mapping,
// into an error wrapping ErrCorrupt. debug.SetPanicOnFault makes a fault
// (SIGBUS or SIGSEGV on reading a mapping past the end of its file) a
// panic instead of a crash; it covers this goroutine only.
func boltRecover(fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("%w: bbolt panicked: %v", ErrCorrupt, r)
		}
	}()
	return fn()
}

// boltClassify turns a bolt.Open error into one for the operator. Errors of
// the system (open, stat, mmap: *fs.PathError, syscall.Errno) say nothing
// about the content; every other one is bbolt rejecting the content: bad
// magic, version or checksum, or a file too small for its page size.
func boltClassify(path string, err error) error {
	var (
		pathErr *fs.PathError
		errno   syscall.Errno
	)
	switch {
	case errors.Is(err, berrors.ErrTimeout):
		return fmt.Errorf("policystore: %s is locked: another stsmap seems to use the file (waited %s); stop it, or give this one its own cache.path: %w",
			path, boltLockTimeout, err)
	case errors.As(err, &pathErr), errors.As(err, &errno):
		return boltOpenError(path, err)
	default:
		return &boltDamage{reason: err.Error()}
	}
}

// boltOpenError reports a file or directory the system will not let us
// open, with what to do about it.
func boltOpenError(path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) && pe.Path == path {
		err = pe.Err // the path is named once
	}
	if errors.Is(err, fs.ErrPermission) {
		return fmt.Errorf("policystore: cannot open the policy store %s: %w; check that the file and its directory belong to the user stsmap runs as, or set cache.path to a file it may write", path, err)
	}
	return fmt.Errorf("policystore: cannot open the policy store %s: %w", path, err)
}

// moveAside renames a damaged file out of the way, so that a new store can
// be created and the old bytes are kept for a post-mortem. The caller
// logs the new name (MovedAside); the reason is logged here.
func (b *Bolt) moveAside(damage *boltDamage) (string, error) {
	b.log.Warn("policy store is damaged", "path", b.path, "err", damage.reason)
	base := b.path + ".corrupt-" + time.Now().UTC().Format("20060102T150405Z")
	name := base
	for i := 1; ; i++ {
		if _, err := os.Lstat(name); errors.Is(err, fs.ErrNotExist) {
			break
		}
		name = fmt.Sprintf("%s.%d", base, i)
	}
	if err := os.Rename(b.path, name); err != nil {
		return "", fmt.Errorf("policystore: %s is damaged (%s) and cannot be moved aside: %w; move or delete it", b.path, damage.reason, err)
	}
	if err := boltSyncDir(filepath.Dir(b.path)); err != nil {
		return "", fmt.Errorf("policystore: moving %s aside: %w", b.path, err)
	}
	return name, nil
}

// boltInit creates the buckets of a new store, or checks the format of an
// existing one. A bbolt file without buckets is new (a crash may come
// between its creation and this); one with other buckets belongs to
// something else and is left alone.
func boltInit(db *bolt.DB, path string) error {
	var needInit bool
	err := db.View(func(tx *bolt.Tx) error {
		meta := tx.Bucket(boltMeta)
		if meta == nil {
			empty := tx.ForEach(func([]byte, *bolt.Bucket) error { return errBoltNotEmpty }) == nil
			if !empty {
				return fmt.Errorf("policystore: %s is a bbolt file but not an stsmap policy store (no %q bucket); set cache.path to another file", path, boltMeta)
			}
			needInit = true
			return nil
		}
		got := meta.Get(boltFormat)
		switch {
		case got == nil:
			return fmt.Errorf("policystore: %s is a bbolt file but not an stsmap policy store (no store format); set cache.path to another file", path)
		case string(got) != boltFormatVersion:
			return fmt.Errorf("policystore: %s was written by a newer stsmap (store format %s, this one reads %q); run that version, or move the file away to start with an empty store",
				path, clip(string(got)), boltFormatVersion)
		}
		needInit = tx.Bucket(boltPolicies) == nil
		return nil
	})
	if err != nil || !needInit {
		return err
	}
	return db.Update(func(tx *bolt.Tx) error {
		meta, err := tx.CreateBucketIfNotExists(boltMeta)
		if err != nil {
			return err
		}
		if err := meta.Put(boltFormat, []byte(boltFormatVersion)); err != nil {
			return err
		}
		_, err = tx.CreateBucketIfNotExists(boltPolicies)
		return err
	})
}

var errBoltNotEmpty = errors.New("not empty")

// boltSyncDir makes a file's creation or rename in dir durable.
func boltSyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
