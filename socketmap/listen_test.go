package socketmap

import (
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
)

func TestChown(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.sock")
	l, err := Listen("unix:"+path, 0o660)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	me, _ := user.Current()
	g, _ := user.LookupGroupId(me.Gid)
	// Our own user and group, by name and by number: allowed without root.
	for _, tc := range []struct{ owner, group string }{{me.Username, g.Name}, {me.Uid, me.Gid}, {"", ""}} {
		if err := Chown("unix:"+path, tc.owner, tc.group); err != nil {
			t.Errorf("Chown(%q, %q): %v", tc.owner, tc.group, err)
		}
	}
	st, _ := os.Stat(path)
	if uid := st.Sys().(*syscall.Stat_t).Uid; strconv.Itoa(int(uid)) != me.Uid {
		t.Errorf("socket owner: got %d, want %s", uid, me.Uid)
	}
	if err := Chown("unix:"+path, "no-such-user-stsmap", ""); err == nil {
		t.Errorf("Chown to an unknown user: want an error")
	}
	if err := Chown("127.0.0.1:8461", "root", "root"); err != nil {
		t.Errorf("Chown of a TCP address: got %v, want nothing done", err)
	}
}
