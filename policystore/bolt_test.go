package policystore

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"testing/synctest"
	"time"

	bolt "go.etcd.io/bbolt"
	berrors "go.etcd.io/bbolt/errors"

	"stsmap/policycache"
	"stsmap/resolver"
)

// boltLogs records log lines, for tests that count warnings.
type boltLogs struct {
	mu      sync.Mutex
	records []slog.Record
}

func (l *boltLogs) Enabled(context.Context, slog.Level) bool { return true }
func (l *boltLogs) WithAttrs([]slog.Attr) slog.Handler       { return l }
func (l *boltLogs) WithGroup(string) slog.Handler            { return l }
func (l *boltLogs) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.records = append(l.records, r.Clone())
	return nil
}

// at returns the records at level.
func (l *boltLogs) at(level slog.Level) []slog.Record {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []slog.Record
	for _, r := range l.records {
		if r.Level == level {
			out = append(out, r)
		}
	}
	return out
}

func boltAttr(r slog.Record, key string) slog.Value {
	var v slog.Value
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == key {
			v = a.Value
			return false
		}
		return true
	})
	return v
}

// openTestBolt opens a store at path and closes it at the end of the test.
func openTestBolt(t testing.TB, path string) (*Bolt, *boltLogs) {
	t.Helper()
	logs := &boltLogs{}
	b, err := OpenBolt(path, slog.New(logs))
	if err != nil {
		t.Fatalf("OpenBolt: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return b, logs
}

// loadAll returns what Load delivers, by domain.
func loadAll(t *testing.T, b *Bolt, now time.Time) map[string]*policycache.Entry {
	t.Helper()
	got := map[string]*policycache.Entry{}
	if err := b.Load(t.Context(), now, func(e *policycache.Entry) {
		if _, dup := got[e.Domain]; dup {
			t.Errorf("Load delivered %s twice", e.Domain)
		}
		got[e.Domain] = e
	}); err != nil {
		t.Fatalf("Load: %v", err)
	}
	return got
}

// rawKeys lists the keys of the policies bucket.
func rawKeys(t *testing.T, b *Bolt) []string {
	t.Helper()
	var keys []string
	if err := b.db.View(func(tx *bolt.Tx) error {
		return tx.Bucket(boltPolicies).ForEach(func(k, _ []byte) error {
			keys = append(keys, string(k))
			return nil
		})
	}); err != nil {
		t.Fatal(err)
	}
	return keys
}

func rawPut(t *testing.T, b *Bolt, key string, value []byte) {
	t.Helper()
	if err := b.db.Update(func(tx *bolt.Tx) error {
		return tx.Bucket(boltPolicies).Put([]byte(key), value)
	}); err != nil {
		t.Fatal(err)
	}
}

func TestBoltPutGetDelete(t *testing.T) {
	ctx := t.Context()
	b, _ := openTestBolt(t, filepath.Join(t.TempDir(), "policies.db"))
	fetched := time.Date(2024, 6, 1, 12, 0, 0, 987654321, time.Local)
	none := &policycache.Entry{Domain: "none.example", ID: "7", Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{Mode: resolver.ModeNone, MaxAge: time.Hour}, Fetched: fetched, Expires: fetched.Add(time.Hour)}

	for _, want := range []*policycache.Entry{codecSample("example.com", fetched), none} {
		t.Run(want.Domain, func(t *testing.T) {
			if err := b.Put(ctx, want); err != nil {
				t.Fatalf("Put: %v", err)
			}
			got, err := b.Get(ctx, want.Domain)
			if err != nil {
				t.Fatalf("Get: %v", err)
			}
			if d := codecDiff(got, want); d != "" {
				t.Errorf("Get after Put: %s", d)
			}
			if err := b.Delete(ctx, want.Domain); err != nil {
				t.Fatalf("Delete: %v", err)
			}
			if got, err := b.Get(ctx, want.Domain); got != nil || err != nil {
				t.Errorf("Get after Delete = %v, %v; want nil, nil", got, err)
			}
		})
	}

	if got, err := b.Get(ctx, "missing.example"); got != nil || err != nil {
		t.Errorf("Get(missing) = %v, %v; want nil, nil", got, err)
	}
	if err := b.Delete(ctx, "missing.example"); err != nil {
		t.Errorf("Delete(missing) = %v; want nil", err)
	}
	if ok, err := b.Claim(ctx, "example.com", time.Minute); !ok || err != nil {
		t.Errorf("Claim = %v, %v; want true, nil", ok, err)
	}
}

func TestBoltPutRefuses(t *testing.T) {
	b, _ := openTestBolt(t, filepath.Join(t.TempDir(), "policies.db"))
	now := time.Unix(1700000000, 0)
	noPolicy := &policycache.Entry{Domain: "example.com", Reason: policycache.ReasonNoRecord, Fetched: now, Expires: now.Add(time.Hour)}
	noDomain := codecSample("", now)
	backwards := codecSample("example.com", now)
	backwards.Expires = now.Add(-time.Second)
	for _, tc := range []struct {
		name string
		e    *policycache.Entry
	}{
		{"no policy", noPolicy},
		{"no domain", noDomain},
		{"expires before fetched", backwards},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := b.Put(t.Context(), tc.e); err == nil {
				t.Errorf("Put succeeded; want an error")
			}
		})
	}
	if keys := rawKeys(t, b); len(keys) != 0 {
		t.Errorf("stored keys = %q; want none", keys)
	}
}

func TestBoltContextCanceled(t *testing.T) {
	b, _ := openTestBolt(t, filepath.Join(t.TempDir(), "policies.db"))
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	now := time.Now()
	if err := b.Put(ctx, codecSample("example.com", now)); !errors.Is(err, context.Canceled) {
		t.Errorf("Put = %v; want context.Canceled", err)
	}
	if _, err := b.Get(ctx, "example.com"); !errors.Is(err, context.Canceled) {
		t.Errorf("Get = %v; want context.Canceled", err)
	}
	if err := b.Delete(ctx, "example.com"); !errors.Is(err, context.Canceled) {
		t.Errorf("Delete = %v; want context.Canceled", err)
	}
	if err := b.Load(ctx, now, func(*policycache.Entry) {}); !errors.Is(err, context.Canceled) {
		t.Errorf("Load = %v; want context.Canceled", err)
	}
}

func TestBoltLoad(t *testing.T) {
	ctx := t.Context()
	path := filepath.Join(t.TempDir(), "policies.db")
	b, logs := openTestBolt(t, path)
	now := time.Date(2024, 6, 1, 12, 0, 0, 0, time.UTC)

	entry := func(domain string, fetchedAgo, lifetime time.Duration) *policycache.Entry {
		e := codecSample(domain, now.Add(-fetchedAgo))
		e.Expires = e.Fetched.Add(lifetime)
		return e
	}
	stored := []struct {
		e         *policycache.Entry
		unexpired bool
	}{
		{entry("fresh.example", time.Hour, 24*time.Hour), true},
		{entry("last-second.example", time.Hour, time.Hour+time.Second), true},
		{entry("expired.example", 48*time.Hour, 24*time.Hour), false},
		{entry("expires-now.example", time.Hour, time.Hour), false}, // SPEC 6.2: at Expires it is expired
	}
	for _, s := range stored {
		if err := b.Put(ctx, s.e); err != nil {
			t.Fatalf("Put(%s): %v", s.e.Domain, err)
		}
	}
	rawPut(t, b, "garbage.example", []byte("\x00\xffnot a record"))
	misfiled, err := Encode(entry("other.example", time.Hour, 24*time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	rawPut(t, b, "misfiled.example", misfiled)

	got := loadAll(t, b, now)
	for _, s := range stored {
		e, ok := got[s.e.Domain]
		if ok != s.unexpired {
			t.Errorf("Load delivered %s: %v, want %v", s.e.Domain, ok, s.unexpired)
			continue
		}
		if ok {
			if d := codecDiff(e, s.e); d != "" {
				t.Errorf("Load(%s): %s", s.e.Domain, d)
			}
		}
	}
	if len(got) != 2 {
		t.Errorf("Load delivered %d entries, want 2", len(got))
	}
	warns := logs.at(slog.LevelWarn)
	if len(warns) != 1 {
		t.Fatalf("Load logged %d warnings, want 1: %v", len(warns), warns)
	}
	if n := boltAttr(warns[0], "count").Int64(); n != 2 {
		t.Errorf("warning count = %d, want 2", n)
	}

	// The pruning is on disk.
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	b, logs = openTestBolt(t, path)
	want := []string{"fresh.example", "last-second.example"}
	if keys := rawKeys(t, b); !slices.Equal(keys, want) {
		t.Errorf("keys after reopening = %q, want %q", keys, want)
	}
	if got := loadAll(t, b, now); len(got) != 2 {
		t.Errorf("second Load delivered %d entries, want 2", len(got))
	}
	if warns := logs.at(slog.LevelWarn); len(warns) != 0 {
		t.Errorf("second Load logged warnings: %v", warns)
	}
}

// TestBoltLoadRecoversPanic damages pages under an open store: the file is
// mapped shared, so bbolt reads the damage and panics; Load must turn that
// into an error.
func TestBoltLoadRecoversPanic(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policies.db")
	b, _ := openTestBolt(t, path)
	now := time.Now()
	boltPutMany(t, b, 200, 1)
	pageSize := b.db.Info().PageSize
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, int(fi.Size())-2*pageSize), int64(2*pageSize)); err != nil {
		t.Fatal(err)
	}
	f.Close()

	called := false
	err = b.Load(t.Context(), now, func(*policycache.Entry) { called = true })
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("Load = %v; want an error wrapping ErrCorrupt", err)
	}
	if called {
		t.Errorf("Load called fn despite the error")
	}
}

func TestBoltReopen(t *testing.T) {
	ctx := t.Context()
	dir := filepath.Join(t.TempDir(), "state", "stsmap")
	path := filepath.Join(dir, "policies.db")
	b, _ := openTestBolt(t, path)
	want := codecSample("example.com", time.Now())
	if err := b.Put(ctx, want); err != nil {
		t.Fatal(err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	b, _ = openTestBolt(t, path)
	if moved := b.MovedAside(); moved != "" {
		t.Errorf("MovedAside = %q, want empty", moved)
	}
	got, err := b.Get(ctx, want.Domain)
	if err != nil {
		t.Fatal(err)
	}
	if d := codecDiff(got, want); d != "" {
		t.Errorf("Get after reopening: %s", d)
	}

	for _, tc := range []struct {
		path string
		mode fs.FileMode
	}{
		{dir, fs.ModeDir | 0o700},
		{path, 0o600},
	} {
		fi, err := os.Stat(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		if got := fi.Mode(); got != tc.mode {
			t.Errorf("mode of %s = %v, want %v", tc.path, got, tc.mode)
		}
	}
}

// boltPutMany stores n entries in commits transactions, faster than n Puts
// (a lone Put waits for bbolt's batch delay).
func boltPutMany(t *testing.T, b *Bolt, n, commits int) {
	t.Helper()
	now := time.Now()
	for c := range commits {
		if err := b.db.Update(func(tx *bolt.Tx) error {
			for i := c; i < n; i += commits {
				v, err := Encode(codecSample(fmt.Sprintf("d%04d.example", i), now))
				if err != nil {
					return err
				}
				if err := tx.Bucket(boltPolicies).Put(fmt.Appendf(nil, "d%04d.example", i), v); err != nil {
					return err
				}
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
}

// realBolt returns the bytes of a store holding n entries, and the page
// size.
func realBolt(t *testing.T, n int) ([]byte, int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "real.db")
	b, err := OpenBolt(path, slog.New(&boltLogs{}))
	if err != nil {
		t.Fatal(err)
	}
	boltPutMany(t, b, n, 10)
	pageSize := b.db.Info().PageSize
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return data, pageSize
}

// boltPages returns the ids of the freelist page and of a leaf page of a
// store's bytes.
func boltPages(t *testing.T, data []byte) (freelist, leaf int) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "probe.db")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	freelist, leaf = -1, -1
	if err := db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			p, err := tx.Page(id)
			if p == nil || err != nil {
				return err
			}
			switch p.Type {
			case "freelist":
				freelist = id
			case "leaf":
				leaf = id
			}
		}
	}); err != nil {
		t.Fatal(err)
	}
	if freelist < 0 || leaf < 0 {
		t.Fatalf("no freelist (%d) or leaf (%d) page found", freelist, leaf)
	}
	return freelist, leaf
}

// freelistPage returns a store's bytes with its freelist page replaced by
// what write returns. It knows bbolt's page layout: a 16-byte header (id,
// flags, count, overflow), then the free page ids.
func freelistPage(t *testing.T, data []byte, pageSize int, write func(p []byte, id, leaf int)) []byte {
	t.Helper()
	freelist, leaf := boltPages(t, data)
	out := bytes.Clone(data)
	p := out[freelist*pageSize : (freelist+1)*pageSize]
	clear(p)
	write(p, freelist, leaf)
	return out
}

// freeingLive frees a page the tree uses: every page reads, but bbolt's
// Check fails, and a write would overwrite live data.
func freeingLive(p []byte, id, leaf int) {
	binary.LittleEndian.PutUint64(p[0:], uint64(id))
	binary.LittleEndian.PutUint16(p[8:], 0x10) // freelist page
	binary.LittleEndian.PutUint16(p[10:], 1)   // one id
	binary.LittleEndian.PutUint64(p[16:], uint64(leaf))
}

func TestBoltDamagedFileMovedAside(t *testing.T) {
	real, pageSize := realBolt(t, 1000)
	rng := rand.New(rand.NewPCG(1, 2))
	random := func(n int) []byte {
		b := make([]byte, n)
		for i := range b {
			b[i] = byte(rng.Uint32())
		}
		return b
	}
	afterMeta := func(fill []byte) []byte {
		return append(bytes.Clone(real[:2*pageSize]), fill...)
	}

	for _, tc := range []struct {
		name string
		data []byte
	}{
		{"random bytes", random(64 << 10)},
		{"zero length", []byte{}},
		{"truncated to 100 bytes", real[:100]},
		{"truncated to one page", real[:pageSize]},
		{"truncated past the meta pages", real[:2*pageSize+1]},
		{"truncated to half", real[:len(real)/2]},
		{"random pages after the meta pages", afterMeta(random(len(real) - 2*pageSize))},
		{"zeroed pages after the meta pages", afterMeta(make([]byte, len(real)-2*pageSize))},
		// Read by bolt.Open: it panics (boltOpenChecked).
		{"zeroed freelist page", freelistPage(t, real, pageSize, func([]byte, int, int) {})},
		// Found by bbolt's Check only.
		{"freelist frees a live page", freelistPage(t, real, pageSize, freeingLive)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policies.db")
			if err := os.WriteFile(path, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
			b, logs := openTestBolt(t, path)
			moved := b.MovedAside()
			if !strings.HasPrefix(moved, path+".corrupt-") {
				t.Fatalf("MovedAside = %q, want %s.corrupt-<time>", moved, path)
			}
			old, err := os.ReadFile(moved)
			if err != nil {
				t.Fatalf("reading the moved file: %v", err)
			}
			if !bytes.Equal(old, tc.data) {
				t.Errorf("moved file holds %d bytes, not the %d old ones", len(old), len(tc.data))
			}
			if warns := logs.at(slog.LevelWarn); len(warns) != 1 {
				t.Errorf("logged %d warnings, want 1 (the reason)", len(warns))
			} else {
				t.Logf("reason: %s", boltAttr(warns[0], "err"))
			}
			if got := loadAll(t, b, time.Now()); len(got) != 0 {
				t.Errorf("Load delivered %d entries from a new store", len(got))
			}
			e := codecSample("example.com", time.Now())
			if err := b.Put(t.Context(), e); err != nil {
				t.Fatalf("Put into the new store: %v", err)
			}
			if got, err := b.Get(t.Context(), e.Domain); err != nil || codecDiff(got, e) != "" {
				t.Errorf("Get from the new store = %v, %v", got, err)
			}
		})
	}
}

// TestBoltRecoverFault reads a mapping past the end of its file, as bbolt
// does on a page number that a damaged file puts past its end: the SIGBUS
// must become an error, not kill the process.
func TestBoltRecoverFault(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "short"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	pageSize := os.Getpagesize()
	if err := f.Truncate(int64(pageSize)); err != nil {
		t.Fatal(err)
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, 2*pageSize, syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer syscall.Munmap(m)
	var b byte
	err = boltRecover(func() error {
		b = m[pageSize] // past the end of the file
		return nil
	})
	if !errors.Is(err, ErrCorrupt) {
		t.Errorf("boltRecover = %v (read %d); want an error wrapping ErrCorrupt", err, b)
	}
}

// TestBoltLocked opens the same file twice: bbolt's flock conflicts also
// between two descriptors of one process.
func TestBoltLocked(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policies.db")
	openTestBolt(t, path)
	b, err := OpenBolt(path, slog.New(&boltLogs{}))
	if err == nil {
		b.Close()
		t.Fatal("second OpenBolt succeeded; want an error")
	}
	t.Logf("error: %v", err)
	if msg := err.Error(); !strings.Contains(msg, "another stsmap") || !strings.Contains(msg, path) {
		t.Errorf("error %q does not say that another stsmap uses %s", msg, path)
	}
	if !errors.Is(err, berrors.ErrTimeout) {
		t.Errorf("error %v does not wrap berrors.ErrTimeout", err)
	}
	boltNothingMoved(t, path)
}

// boltNothingMoved checks that path is still there and nothing was moved
// aside.
func boltNothingMoved(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); err != nil {
		t.Errorf("the store is gone: %v", err)
	}
	if moved, _ := filepath.Glob(path + ".corrupt-*"); len(moved) != 0 {
		t.Errorf("files moved aside: %q", moved)
	}
}

func TestBoltUnreadable(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("running as root, which reads any file: chmod 000 cannot make the store unreadable")
	}
	path := filepath.Join(t.TempDir(), "policies.db")
	b, _ := openTestBolt(t, path)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, 0); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.Chmod(path, 0o600) })

	b, err := OpenBolt(path, slog.New(&boltLogs{}))
	if err == nil {
		b.Close()
		t.Fatal("OpenBolt succeeded; want an error")
	}
	t.Logf("error: %v", err)
	if !errors.Is(err, fs.ErrPermission) {
		t.Errorf("error %v does not match fs.ErrPermission", err)
	}
	if msg := err.Error(); !strings.Contains(msg, path) || !strings.Contains(msg, "cache.path") {
		t.Errorf("error %q does not name %s and cache.path", msg, path)
	}
	boltNothingMoved(t, path)
}

// TestBoltRefusesForeignFiles checks the bbolt files OpenBolt must neither
// use nor move aside.
func TestBoltRefusesForeignFiles(t *testing.T) {
	for _, tc := range []struct {
		name    string
		prepare func(tx *bolt.Tx) error
		wantErr string
	}{
		{"newer format", func(tx *bolt.Tx) error {
			m, err := tx.CreateBucket(boltMeta)
			if err != nil {
				return err
			}
			return m.Put(boltFormat, []byte("2"))
		}, "newer stsmap"},
		{"no store format", func(tx *bolt.Tx) error {
			_, err := tx.CreateBucket(boltMeta)
			return err
		}, "not an stsmap policy store"},
		{"another program's buckets", func(tx *bolt.Tx) error {
			_, err := tx.CreateBucket([]byte("accounts"))
			return err
		}, "not an stsmap policy store"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "policies.db")
			db, err := bolt.Open(path, 0o600, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := db.Update(tc.prepare); err != nil {
				t.Fatal(err)
			}
			db.Close()

			b, err := OpenBolt(path, slog.New(&boltLogs{}))
			if err == nil {
				b.Close()
				t.Fatal("OpenBolt succeeded; want an error")
			}
			t.Logf("error: %v", err)
			if msg := err.Error(); !strings.Contains(msg, tc.wantErr) || !strings.Contains(msg, path) {
				t.Errorf("error %q does not say %q and name %s", msg, tc.wantErr, path)
			}
			boltNothingMoved(t, path)
		})
	}
}

// TestBoltEmptyBoltFile: a bbolt file without buckets (a crash between its
// creation and OpenBolt's first commit) becomes a store.
func TestBoltEmptyBoltFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policies.db")
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		t.Fatal(err)
	}
	db.Close()
	b, _ := openTestBolt(t, path)
	if moved := b.MovedAside(); moved != "" {
		t.Errorf("MovedAside = %q, want empty", moved)
	}
	if err := b.Put(t.Context(), codecSample("example.com", time.Now())); err != nil {
		t.Errorf("Put: %v", err)
	}
}

func TestBoltConcurrentPuts(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policies.db")
	b, _ := openTestBolt(t, path)
	now := time.Now()
	const n = 50
	want := make([]*policycache.Entry, n)
	for i := range want {
		want[i] = codecSample(fmt.Sprintf("d%02d.example", i), now)
	}
	var wg sync.WaitGroup
	for _, e := range want {
		wg.Go(func() {
			if err := b.Put(t.Context(), e); err != nil {
				t.Errorf("Put(%s): %v", e.Domain, err)
			}
		})
	}
	wg.Wait()
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}

	b, _ = openTestBolt(t, path)
	got := loadAll(t, b, now)
	for _, e := range want {
		if d := codecDiff(got[e.Domain], e); d != "" {
			t.Errorf("%s after reopening: %s", e.Domain, d)
		}
	}
	if len(got) != n {
		t.Errorf("Load delivered %d entries, want %d", len(got), n)
	}
}

// TestBoltLeavesNoGoroutine runs a store's life in a synctest bubble, which
// fails the test when a goroutine (bbolt's Check, a batch timer) is left
// blocked at the end.
func TestBoltLeavesNoGoroutine(t *testing.T) {
	path := filepath.Join(t.TempDir(), "policies.db")
	b, _ := openTestBolt(t, path)
	boltPutMany(t, b, 100, 2)
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	synctest.Test(t, func(t *testing.T) {
		b, err := OpenBolt(path, slog.New(&boltLogs{}))
		if err != nil {
			t.Fatal(err)
		}
		if err := b.Put(t.Context(), codecSample("example.com", time.Now())); err != nil {
			t.Error(err)
		}
		if err := b.Load(t.Context(), time.Now(), func(*policycache.Entry) {}); err != nil {
			t.Error(err)
		}
		if err := b.Close(); err != nil {
			t.Error(err)
		}
	})
}

// benchEntry is a synthetic enforce policy with two mx.
func benchEntry(i int, now time.Time) *policycache.Entry {
	d := fmt.Sprintf("d%06d.example", i)
	e := &policycache.Entry{Domain: d, ID: "20240601T000000", Reason: policycache.ReasonPolicy,
		Policy: &resolver.Policy{Mode: resolver.ModeEnforce, MaxAge: 7 * 24 * time.Hour,
			MX:    []string{"mx1." + d, "mx2." + d},
			Lines: []string{"version: STSv1", "mode: enforce", "mx: mx1." + d, "mx: mx2." + d, "max_age: 604800"}},
		Fetched: now, Expires: now.Add(7 * 24 * time.Hour)}
	e.LastUsed.Store(now.Unix())
	return e
}

// boltBenchFile writes n entries in one transaction and returns the path.
func boltBenchFile(b *testing.B, n int, now time.Time) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "policies.db")
	s, err := OpenBolt(path, slog.New(&boltLogs{}))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	if err := s.db.Update(func(tx *bolt.Tx) error {
		bk := tx.Bucket(boltPolicies)
		bk.FillPercent = 0.9 // keys are written in order
		for i := range n {
			v, err := Encode(benchEntry(i, now))
			if err != nil {
				return err
			}
			if err := bk.Put(fmt.Appendf(nil, "d%06d.example", i), v); err != nil {
				return err
			}
		}
		return nil
	}); err != nil {
		b.Fatal(err)
	}
	return path
}

func BenchmarkBoltLoad100k(b *testing.B) {
	const n = 100000
	now := time.Now()
	path := boltBenchFile(b, n, now)
	s, err := OpenBolt(path, slog.New(&boltLogs{}))
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		got := 0
		if err := s.Load(b.Context(), now, func(*policycache.Entry) { got++ }); err != nil {
			b.Fatal(err)
		}
		if got != n {
			b.Fatalf("Load delivered %d entries, want %d", got, n)
		}
	}
	b.ReportMetric(float64(n*b.N)/b.Elapsed().Seconds(), "entries/s")
	b.ReportMetric(float64(fi.Size()), "file_bytes")
}

// BenchmarkBoltOpen100k measures OpenBolt's checks of a file of 100,000
// entries: the start-up cost of boltVerify and bbolt's Check.
func BenchmarkBoltOpen100k(b *testing.B) {
	path := boltBenchFile(b, 100000, time.Now())
	for b.Loop() {
		s, err := OpenBolt(path, slog.New(&boltLogs{}))
		if err != nil {
			b.Fatal(err)
		}
		s.Close()
	}
}

func BenchmarkBoltPut(b *testing.B) {
	now := time.Now()
	b.Run("serial", func(b *testing.B) {
		s, _ := openTestBolt(b, filepath.Join(b.TempDir(), "policies.db"))
		i := 0
		for b.Loop() {
			if err := s.Put(b.Context(), benchEntry(i, now)); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	// Concurrent Puts share commits (db.Batch).
	b.Run("parallel", func(b *testing.B) {
		s, _ := openTestBolt(b, filepath.Join(b.TempDir(), "policies.db"))
		var mu sync.Mutex
		next := 0
		b.SetParallelism(16)
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if err := s.Put(context.Background(), benchEntry(i, now)); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}
