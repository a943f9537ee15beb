package stamp

import (
	"fmt"
	"testing"
)

func TestStamp(t *testing.T) {
	var tb Table
	a := tb.Take("a.example")
	if !a.Current() {
		t.Fatal("a fresh stamp is not current")
	}
	tb.Bump("a.example")
	if a.Current() {
		t.Fatal("a stamp taken before a change is still current after it")
	}
	if b := tb.Take("a.example"); !b.Current() {
		t.Fatal("a stamp taken after the change is not current")
	}
	if !(Stamp{}).Current() {
		t.Fatal("the zero stamp is not current")
	}
}

// A change to one key leaves most other keys' stamps current: keys share
// a counter only by their hash.
func TestStampOtherKeys(t *testing.T) {
	var tb Table
	stamps := make([]Stamp, 1000)
	for i := range stamps {
		stamps[i] = tb.Take(fmt.Sprintf("d%d.example", i))
	}
	tb.Bump("d0.example")
	if stamps[0].Current() {
		t.Fatal("the changed key's stamp is current")
	}
	stale := 0
	for _, s := range stamps[1:] {
		if !s.Current() {
			stale++
		}
	}
	// 999 keys over 8192 counters: a handful may share d0's counter.
	if stale > 10 {
		t.Errorf("%d of 999 other keys' stamps turned stale, want a few at most", stale)
	}
}
