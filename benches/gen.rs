mod common; #[test] fn t(){}
